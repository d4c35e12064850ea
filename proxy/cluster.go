package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/rolegate/rolegate/upstream"
)

// Cluster makes a Server one of several rolegate instances in front of the
// same server (Config.Cluster): it registers on the server under Tag, which
// every cancel key it issues carries in its secret's first byte, and takes
// CancelRequests for other instances' keys to the instance that issued them
// (at its Advertise address), as PostgreSQL would take them to the backend
// wherever the client sent them.
type Cluster struct {
	// Tag tells this instance's cancel keys from other instances'; no two
	// live instances may share one (cmd/rolegate picks one that is free).
	Tag byte
	// Advertise is the host:port the other instances reach this one at:
	// its client-facing listen address, as they can reach it.
	Advertise string
	// Version is reported to the other instances (SHOW INSTANCES).
	Version string
}

// Peer requests: startup packets that only rolegate instances send each
// other, on the client-facing port. The codes sit next to PostgreSQL's
// CancelRequest (1234/5678) and are no protocol version (major 1234).
const (
	// codePeerCancel is a CancelRequest another instance forwards: the same
	// body, handled here and never forwarded again.
	codePeerCancel = 1234<<16 | 5766
	// codePeerStatus asks for this instance's peerStatus (JSON, then close).
	codePeerStatus = 1234<<16 | 5767
	// codePeerNotice tells the instance relaying a backend that another
	// instance is about to terminate it, and why (peerNotice).
	codePeerNotice = 1234<<16 | 5768
)

// clusterView is what the cluster needs from the server (upstream.Control).
type clusterView interface {
	SetInstance(tag byte, advertise string)
	Instances(ctx context.Context) ([]upstream.Instance, error)
}

// cluster is the Server's view of the server's instances, or nil.
func (s *Server) cluster() clusterView {
	if s.cfg.Cluster == nil || s.cfg.Limits == nil {
		return nil
	}
	cv, _ := s.cfg.Limits.Server.(clusterView)
	return cv
}

// peerTimeout bounds one request to another instance: dial, write, read.
const peerTimeout = 5 * time.Second

// instancesTTL is how long the list of instances is reused for forwarding.
const instancesTTL = 2 * time.Second

// instanceCache keeps the list of instances for a moment, so that a burst
// of cancels does not read pg_stat_activity once each.
type instanceCache struct {
	mu   sync.Mutex
	at   time.Time
	list []upstream.Instance
}

// instances lists the live instances, from the cache when it is fresh.
func (s *Server) instances(ctx context.Context, fresh bool) ([]upstream.Instance, error) {
	cv := s.cluster()
	if cv == nil {
		return nil, nil
	}
	c := &s.peers
	c.mu.Lock()
	if !fresh && !c.at.IsZero() && time.Since(c.at) < instancesTTL {
		list := c.list
		c.mu.Unlock()
		return list, nil
	}
	c.mu.Unlock()
	list, err := cv.Instances(ctx)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	c.at, c.list = time.Now(), list
	c.mu.Unlock()
	return list, nil
}

// keyTag is the instance tag a cancel key's secret carries.
func keyTag(secret []byte) (byte, bool) {
	if len(secret) != 4 {
		return 0, false
	}
	return secret[0], true
}

// forwardToPeer takes a CancelRequest for a key this instance did not issue
// to the instance whose tag the key carries; it reports whether one took it.
// The peer checks the key as for its own clients. Nothing is told to the
// client, as PostgreSQL tells it nothing.
func (s *Server) forwardToPeer(ctx context.Context, pid uint32, secret []byte, log *slog.Logger) bool {
	tag, ok := keyTag(secret)
	if !ok || s.cfg.Cluster == nil || tag == s.cfg.Cluster.Tag {
		return false
	}
	list, err := s.instances(ctx, false)
	if err != nil {
		s.quiet.log(log, slog.LevelWarn, "instances", "cancel request not forwarded: the list of instances failed", "err", err)
		return false
	}
	i := slices.IndexFunc(list, func(in upstream.Instance) bool { return in.Tag == tag && !in.Self })
	if i < 0 {
		return false
	}
	peer := list[i]
	body := binary.BigEndian.AppendUint32(nil, codePeerCancel)
	body = binary.BigEndian.AppendUint32(body, pid)
	body = append(body, secret...)
	if err := peerRequest(ctx, peer.Advertise, body, nil); err != nil {
		s.quiet.log(log, slog.LevelWarn, "peer "+peer.Advertise, "cancel request could not be forwarded", "instance", fmt.Sprintf("%02x", tag),
			"peer", peer.Advertise, "err", err)
		return true
	}
	log.Info("cancel request forwarded to another instance", "instance", fmt.Sprintf("%02x", tag), "peer", peer.Advertise)
	return true
}

// peerRequest sends one peer request (a startup packet body) to addr and,
// when out is not nil, reads the answer into it until the peer closes.
func peerRequest(ctx context.Context, addr string, body []byte, out io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, peerTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("dial instance %s: %w", addr, err)
	}
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	pkt := binary.BigEndian.AppendUint32(nil, uint32(len(body)+4))
	if _, err := conn.Write(append(pkt, body...)); err != nil {
		return fmt.Errorf("write to instance %s: %w", addr, err)
	}
	if out == nil {
		return nil
	}
	if _, err := io.Copy(out, io.LimitReader(conn, maxPeerStatus)); err != nil {
		return fmt.Errorf("read from instance %s: %w", addr, err)
	}
	return nil
}

// maxPeerStatus bounds a peer's status answer.
const maxPeerStatus = 4 << 20

// PeerStatus is what an instance says about itself to the others.
type PeerStatus struct {
	Tag       string    `json:"tag"`
	Name      string    `json:"name"` // Config.Instance: its name in the eviction history
	Advertise string    `json:"advertise"`
	Version   string    `json:"version"`
	Started   time.Time `json:"started"`
	Sessions  int       `json:"sessions"`
	PIDs      []uint32  `json:"pids"` // the server backends it relays
}

// status is this instance's PeerStatus.
func (s *Server) status() PeerStatus {
	st := PeerStatus{Name: s.cfg.Instance, Started: s.started, Version: s.cfg.Cluster.Version, Advertise: s.cfg.Cluster.Advertise,
		Tag: fmt.Sprintf("%02x", s.cfg.Cluster.Tag)}
	for _, in := range s.registry.snapshot() {
		if in.User == "" {
			continue // not a login: a cancel, a peer's request (this one)
		}
		st.Sessions++
		if in.BackendPID != 0 {
			st.PIDs = append(st.PIDs, in.BackendPID)
		}
	}
	return st
}

// answerStatus writes this instance's status to a peer that asked.
func (c *clientConn) answerStatus() {
	if c.s.cfg.Cluster == nil {
		return
	}
	b, _ := json.Marshal(c.s.status())
	_, _ = c.client.Write(b)
}

// InstanceInfo is one live instance as SHOW INSTANCES lists it.
type InstanceInfo struct {
	Tag       string
	Advertise string
	Since     time.Time // its registration on the server
	Self      bool
	// From the instance itself; Err says why they are missing.
	Name     string // its name in the eviction history
	Version  string
	Started  time.Time
	Sessions int
	PIDs     []uint32
	Err      string
}

// Instances lists the live instances on the server with what each says of
// itself (asked in parallel, each within peerTimeout); nil without a
// cluster.
func (s *Server) Instances(ctx context.Context) ([]InstanceInfo, error) {
	list, err := s.instances(ctx, true)
	if err != nil || list == nil {
		return nil, err
	}
	out := make([]InstanceInfo, len(list))
	var wg sync.WaitGroup
	for i, in := range list {
		out[i] = InstanceInfo{Tag: fmt.Sprintf("%02x", in.Tag), Advertise: in.Advertise, Since: in.Since, Self: in.Self}
		if in.Self {
			st := s.status()
			out[i].Name, out[i].Version, out[i].Started, out[i].Sessions, out[i].PIDs = st.Name, st.Version, st.Started, st.Sessions, st.PIDs
			continue
		}
		wg.Go(func() {
			var buf bytes.Buffer
			err := peerRequest(ctx, in.Advertise, binary.BigEndian.AppendUint32(nil, codePeerStatus), &buf)
			var st PeerStatus
			if err == nil {
				err = json.Unmarshal(buf.Bytes(), &st)
			}
			if err != nil {
				out[i].Err = err.Error()
				return
			}
			out[i].Name, out[i].Version, out[i].Started, out[i].Sessions, out[i].PIDs = st.Name, st.Version, st.Started, st.Sessions, st.PIDs
		})
	}
	wg.Wait()
	return out, nil
}

// noticeTimeout bounds how long an eviction waits for the other instances
// to take its notice before it signals the victim: the notice is a courtesy
// to the victim's client, never a reason to delay a login long.
const noticeTimeout = 250 * time.Millisecond

// noticePeers tells the other instances that this one is about to terminate
// backend pid, and why, before it does: the instance that relays it tells
// its client why in place of the server's 57P01 text, as this instance does
// for the sessions it relays. It returns once every instance answered, or
// after noticeTimeout.
func (s *Server) noticePeers(ctx context.Context, pid uint32, why string) {
	if s.cfg.Cluster == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, noticeTimeout)
	defer cancel()
	list, err := s.instances(ctx, false)
	if err != nil {
		return
	}
	body := binary.BigEndian.AppendUint32(nil, codePeerNotice)
	body = binary.BigEndian.AppendUint32(body, pid)
	body = append(body, why...)
	var wg sync.WaitGroup
	for _, in := range list {
		if in.Self {
			continue
		}
		wg.Go(func() {
			var answer bytes.Buffer
			if err := peerRequest(ctx, in.Advertise, body, &answer); err == nil && answer.String() == "Y" {
				s.log.Debug("eviction notice taken by the instance that relays the victim", "victim_pid", pid,
					"instance", fmt.Sprintf("%02x", in.Tag))
			}
		})
	}
	wg.Wait()
}

// takeNotice handles another instance's eviction notice: when this instance
// relays the backend, its client will be told the reason, as for an
// eviction of this instance's own. Only the instances registered on the
// server (or a process on this host) may send one, and the reason lapses
// after victimGoneTimeout if the backend does not end, so that a notice
// cannot change what a later, unrelated termination says.
func (c *clientConn) takeNotice() {
	s, p := c.s, c.startup
	answer := []byte("N")
	defer func() { _, _ = c.client.Write(answer) }()
	if s.cfg.Cluster == nil || !strings.HasPrefix(p.notice, "terminating connection: ") || !utf8.ValidString(p.notice) {
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, noticeTimeout)
	defer cancel()
	if !s.fromPeer(ctx, c.client.RemoteAddr()) {
		s.quiet.log(c.log, slog.LevelWarn, "notice", "eviction notice from an address that is no rolegate instance ignored")
		return
	}
	sess := s.registry.byBackendPID(p.cancelPID)
	if sess == nil {
		return
	}
	msg := p.notice
	if !sess.evictMsg.CompareAndSwap(nil, &msg) {
		return // this instance's own eviction or kill is under way
	}
	time.AfterFunc(victimGoneTimeout, func() { sess.evictMsg.CompareAndSwap(&msg, nil) })
	c.log.Info("eviction notice from another instance", "pid", p.cancelPID, "role", sess.user, "database", sess.database,
		"reason", msg)
	answer = []byte("Y")
}

// fromPeer reports whether addr is a rolegate instance's: on this host, or
// the host of a registered instance's advertise address.
func (s *Server) fromPeer(ctx context.Context, addr net.Addr) bool {
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return false
	}
	if ta.IP.IsLoopback() {
		return true
	}
	list, err := s.instances(ctx, false)
	if err != nil {
		return false
	}
	for _, in := range list {
		host, _, err := net.SplitHostPort(in.Advertise)
		if err != nil {
			continue
		}
		ips, err := net.DefaultResolver.LookupIPAddr(ctx, host)
		if err != nil {
			continue
		}
		for _, ip := range ips {
			if ip.IP.Equal(ta.IP) {
				return true
			}
		}
	}
	return false
}
