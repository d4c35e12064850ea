package proxy

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

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

// Three instances and direct logins at once, for each policy, at a small
// scale: the server's count of the role's sessions, sampled throughout,
// never exceeds the limit; no login fails but with the role's 53300 (and
// under newest-wins and wait, none through rolegate); an evicted session
// through rolegate is told rolegate's reason, whichever instance evicted
// it; under evict-idle the sessions in a transaction live on.
func TestClusterLimits(t *testing.T) {
	t.Parallel()
	const (
		perInstance = 8
		directs     = 6
		limit       = 3
	)
	for k, policy := range []limiter.Policy{limiter.PolicyReject, limiter.PolicyWait, limiter.PolicyNewestWins, limiter.PolicyEvictIdle} {
		t.Run(policy.String(), func(t *testing.T) {
			t.Parallel()
			role := "cluster_" + strings.ReplaceAll(policy.String(), "-", "_")
			pw := newRole(t, role, limit)
			rule := limiter.Rule{MaxSessions: limit, Policy: policy, Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute}
			var ps []*testProxy
			var ctls []*upstream.Control
			for i := range 3 {
				ctl := superControl(t, shared)
				ctls = append(ctls, ctl)
				ps = append(ps, viewProxy(t, ctl, ctl, role, rule, func(c *Config) {
					c.Cluster = &Cluster{Tag: byte(0xd0 + 4*k + i)}
					c.StartupTimeout = 5 * time.Minute
				}))
			}
			waitListening(t, ctls...)
			// Under evict-idle two sessions sit in a transaction: never victims.
			var inTx []pgx.Tx
			if policy == limiter.PolicyEvictIdle {
				for i := range 2 {
					tx, err := connect(t, ps[i].DSN(role, pw, "app")).Begin(context.Background())
					if err != nil {
						t.Fatal(err)
					}
					inTx = append(inTx, tx)
				}
			}
			withDirect := policy == limiter.PolicyReject || policy == limiter.PolicyNewestWins
			type result struct {
				err    error
				direct bool
			}
			var dsns []string
			for i := range 3 * perInstance {
				dsns = append(dsns, ps[i%3].DSN(role, pw, "app"))
			}
			n := len(dsns)
			if withDirect {
				for range directs {
					dsns = append(dsns, shared.DSN(role, pw, "app"))
				}
			}
			stop := sampleSessions(t, role)
			results := make([]result, len(dsns))
			start := make(chan struct{})
			var wg sync.WaitGroup
			for i, dsn := range dsns {
				wg.Go(func() {
					<-start
					c, err := tryConnect(dsn, 5*time.Minute, nil)
					if err == nil {
						ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
						// Held briefly; under evicting policies a session may
						// be evicted meanwhile (57P01), which is its fate.
						_, err = c.Exec(ctx, "select pg_sleep(0.02)")
						cancel()
						// A session through rolegate is told why, whichever
						// instance evicted it; a direct one gets the server's text.
						if (policy == limiter.PolicyNewestWins || policy == limiter.PolicyEvictIdle) && sqlstate(err) == "57P01" &&
							(i >= n || strings.Contains(err.Error(), "rolegate evicted this session for a newer login of role")) {
							err = nil
						}
						c.Close(context.Background())
					}
					results[i] = result{err: err, direct: i >= n}
				})
			}
			close(start)
			wg.Wait()
			most, samples := stop()
			t.Logf("at most %d sessions in %d samples", most, samples)
			if most > limit {
				t.Errorf("%d sessions of %s at once, limit %d", most, role, limit)
			}
			in := 0
			for _, r := range results {
				switch {
				case r.err == nil:
					in++
				case sqlstate(r.err) == "53300" && strings.Contains(r.err.Error(), fmt.Sprintf("too many connections for role %q", role)):
					if !r.direct && (policy == limiter.PolicyNewestWins || policy == limiter.PolicyWait) {
						t.Errorf("a login through rolegate got 53300 under %s: %v", policy, r.err)
					}
				default:
					t.Errorf("login (direct %v): %v", r.direct, r.err)
				}
			}
			if in < limit-len(inTx) {
				t.Errorf("only %d logins got in", in)
			}
			for i, tx := range inTx {
				if _, err := tx.Exec(context.Background(), "select 1"); err != nil {
					t.Errorf("session %d in a transaction was disturbed: %v", i, err)
				}
			}
			for _, p := range ps {
				// A session chosen idle that ran a query before the signal is
				// left alone, as it should be (the guard), and that is logged.
				l := slices.DeleteFunc(admissionWarnings(p), func(line string) bool {
					return policy == limiter.PolicyEvictIdle && strings.Contains(line, "no longer idle since it was chosen")
				})
				if len(l) != 0 {
					t.Errorf("warnings on %s:\n%s", p.Addr(), strings.Join(l, "\n"))
				}
			}
		})
	}
}

// A session one instance relays, evicted by a login through another: the
// evicting instance tells the relaying one first, so the victim's client
// reads rolegate's reason, as if its own instance had evicted it.
func TestClusterEvictionToldWhy(t *testing.T) {
	t.Parallel()
	const role = "cluster_told"
	pw := newRole(t, role, -1)
	rule := limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject}
	var ps []*testProxy
	var ctls []*upstream.Control
	for _, tag := range []byte{0xe1, 0xe2} {
		ctl := superControl(t, shared)
		ctls = append(ctls, ctl)
		ps = append(ps, viewProxy(t, ctl, ctl, role, rule, func(c *Config) { c.Cluster = &Cluster{Tag: tag} }))
	}
	waitListening(t, ctls...)
	waitUntil(t, time.Minute, "both instances registered", func() bool {
		list, err := ps[1].Instances(context.Background())
		return err == nil && slices.ContainsFunc(list, func(in InstanceInfo) bool { return in.Advertise == ps[0].Addr() })
	})
	victim := connect(t, ps[0].DSN(role, pw, "app"))
	pid := backendPID(t, victim)
	winner := connect(t, ps[1].DSN(role, pw, "app"))
	wantAlive(t, winner, "the newer session")
	wantEvicted(t, victim, "role", role, limiter.PolicyNewestWins)
	logged(t, ps[0], 1, "eviction notice from another instance", fmt.Sprintf("pid=%d", pid))
}

// An eviction notice is taken only with rolegate's own kind of reason and
// from a rolegate instance's host, and it lapses when no termination
// follows: a later, unrelated termination says what the server says.
func TestClusterNoticeGuards(t *testing.T) {
	t.Parallel()
	const role = "cluster_notice"
	pw := newRole(t, role, -1)
	ps := clusterProxies(t, role, 0xe5)
	c := connect(t, ps[0].DSN(role, pw, "app"))
	pid := backendPID(t, c)
	sess := ps[0].registry.byBackendPID(pid)
	notice := func(text string) string {
		body := binary.BigEndian.AppendUint32(nil, codePeerNotice)
		body = binary.BigEndian.AppendUint32(body, pid)
		var answer strings.Builder
		if err := peerRequest(context.Background(), ps[0].Addr(), append(body, text...), &answer); err != nil {
			t.Fatal(err)
		}
		return answer.String()
	}
	if a := notice("you have been hacked"); a != "N" || sess.evictMsg.Load() != nil {
		t.Fatalf("a notice with a foreign text: answer %q, message %v", a, sess.evictMsg.Load())
	}
	if a := notice("terminating connection: test notice"); a != "Y" || sess.evictMsg.Load() == nil {
		t.Fatalf("a notice: answer %q, message %v", a, sess.evictMsg.Load())
	}
	waitUntil(t, time.Minute, "the notice to lapse", func() bool { return sess.evictMsg.Load() == nil })
	wantAlive(t, c, "the session after the notice lapsed")
	if ps[0].fromPeer(context.Background(), &net.TCPAddr{IP: net.ParseIP("192.0.2.1"), Port: 1}) {
		t.Error("192.0.2.1, which no instance advertises, is taken for a peer")
	}
	if !ps[0].fromPeer(context.Background(), &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 1}) {
		t.Error("a process on this host is not taken for a peer")
	}
}
