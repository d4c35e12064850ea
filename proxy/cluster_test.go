package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// clusterProxies starts one instance per tag on the shared server, each
// with a control connection of its own, and waits until every one is
// registered. Tests on the shared server use tags of their own: instances of
// other tests are registered there too.
func clusterProxies(t *testing.T, role string, tags ...byte) []*testProxy {
	t.Helper()
	var out []*testProxy
	var ctls []*upstream.Control
	for _, tag := range tags {
		ctl := superControl(t, shared)
		ctls = append(ctls, ctl)
		out = append(out, viewProxy(t, ctl, ctl, role, limiter.NoLimit(), func(c *Config) {
			c.Cluster = &Cluster{Tag: tag, Version: fmt.Sprintf("test-%02x", tag)}
		}))
	}
	waitListening(t, ctls...)
	waitUntil(t, time.Minute, "every instance registered", func() bool {
		list, err := ctls[0].Instances(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range out {
			if !slices.ContainsFunc(list, func(in upstream.Instance) bool {
				return in.Tag == p.cfg.Cluster.Tag && in.Advertise == p.Addr()
			}) {
				return false
			}
		}
		return true
	})
	return out
}

// secretKey is a 3.0 cancel key's secret as sendCancel takes it.
func secretKey(secret uint32) []byte { return binary.BigEndian.AppendUint32(nil, secret) }

// A CancelRequest reaches the session it names through any instance: a
// pg_sleep(30) on one instance, cancelled through each of the other two,
// ends with 57014; a wrong secret, sent through all three, cancels nothing
// (the instance that issued the key drops it, as the server would).
func TestClusterCancelAnywhere(t *testing.T) {
	t.Parallel()
	const role = "cluster_cancel"
	pw := newRole(t, role, -1)
	ps := clusterProxies(t, role, 0xa1, 0xa2, 0xa3)
	owner := connect(t, ps[0].DSN(role, pw, "app"))
	pid, key := owner.PgConn().PID(), owner.PgConn().SecretKey()
	if len(key) != 4 {
		t.Fatalf("cancel key %x, want 4 bytes", key)
	}
	secret := binary.BigEndian.Uint32(key)
	if secret>>24 != 0xa1 {
		t.Fatalf("secret %08x does not carry the instance's tag a1", secret)
	}
	su := connect(t, shared.SuperDSN())

	sleep := func() chan error {
		done := make(chan error, 1)
		go func() {
			_, err := owner.Exec(context.Background(), "select pg_sleep(30)")
			done <- err
		}()
		waitStates(t, su, role, map[string]int{"active": 1})
		return done
	}
	// A wrong secret with the owner's tag goes to the owner, which drops
	// it; one with another instance's tag goes there and is dropped too.
	done := sleep()
	for i, p := range ps {
		sendCancel(t, p.Addr(), pid, secretKey(secret^0x00000f0f))
		sendCancel(t, p.Addr(), pid, secretKey(uint32(0xa1+i)<<24|secret&0xffffff^1))
	}
	logged(t, ps[0], 4, "cancel request with an unknown key ignored")
	waitStates(t, su, role, map[string]int{"active": 1}) // still sleeping
	select {
	case err := <-done:
		t.Fatalf("the query ended after wrong keys: %v", err)
	default:
	}
	for _, p := range ps[1:] {
		sendCancel(t, p.Addr(), pid, secretKey(secret))
		select {
		case err := <-done:
			if sqlstate(err) != "57014" {
				t.Fatalf("cancelled through %s: %v, want 57014", p.Addr(), err)
			}
		case <-time.After(25 * time.Second):
			t.Fatalf("the cancel sent to %s did not reach the session", p.Addr())
		}
		if lines := logLines(p, "cancel request forwarded to another instance", "instance=a1"); len(lines) == 0 {
			t.Errorf("%s did not log the forward", p.Addr())
		}
		if p != ps[len(ps)-1] {
			done = sleep()
		}
	}
	wantAlive(t, owner, "the cancelled session")
}

// SHOW INSTANCES' source: every live instance, with what it says of itself.
func TestClusterInstances(t *testing.T) {
	t.Parallel()
	const role = "cluster_list"
	pw := newRole(t, role, -1)
	ps := clusterProxies(t, role, 0xb1, 0xb2)
	c := connect(t, ps[1].DSN(role, pw, "app"))
	pid := backendPID(t, c)
	list, err := ps[0].Instances(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range ps {
		j := slices.IndexFunc(list, func(in InstanceInfo) bool { return in.Advertise == p.Addr() })
		if j < 0 {
			t.Fatalf("instance %s not listed: %+v", p.Addr(), list)
		}
		in := list[j]
		want := fmt.Sprintf("%02x", 0xb1+i)
		if in.Tag != want || in.Self != (i == 0) || in.Version != "test-"+want || in.Err != "" || in.Started.IsZero() {
			t.Errorf("instance %d: %+v", i, in)
		}
		if i == 1 && (in.Sessions != 1 || !slices.Contains(in.PIDs, pid)) {
			t.Errorf("second instance: %d sessions, pids %v; want its session %d", in.Sessions, in.PIDs, pid)
		}
	}
}

// A forwarded cancel is never forwarded again, and a peer that cannot be
// reached costs the cancel, not the instance.
func TestClusterForwardOnce(t *testing.T) {
	t.Parallel()
	const role = "cluster_once"
	newRole(t, role, -1)
	ps := clusterProxies(t, role, 0xc1)
	c, err := net.DialTimeout("tcp", ps[0].Addr(), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A forwarded cancel for a key of tag c2, which no instance has.
	pkt := binary.BigEndian.AppendUint32(nil, 16)
	pkt = binary.BigEndian.AppendUint32(pkt, codePeerCancel)
	pkt = binary.BigEndian.AppendUint32(pkt, 4242)
	pkt = binary.BigEndian.AppendUint32(pkt, 0xc2000001)
	if _, err := c.Write(pkt); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "timeout") {
		t.Fatalf("read after a forwarded cancel: %v, want the instance's close", err)
	}
	logged(t, ps[0], 1, "cancel request with an unknown key ignored")
	if lines := logLines(ps[0], "forwarded to another instance"); len(lines) != 0 {
		t.Errorf("a forwarded cancel was forwarded again:\n%s", strings.Join(lines, "\n"))
	}
}
