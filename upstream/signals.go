package upstream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// Slot signals: rolegate instances that front the same server tell each
// other, through it, when a slot of a role or database frees (a session
// ended, a reserved login failed) or a login landed as a session (a login
// elsewhere may be waiting to evict it). A waiter is then woken at once
// instead of at its next re-check. Signals go by NOTIFY on channel
// rolegate_slots and arrive on a connection of each instance that LISTENs
// there; they are hints only: a lost one costs a re-check interval, never
// a wrong count, since every decision runs its own census.

// slotChannel is the NOTIFY channel of slot signals.
const slotChannel = "rolegate_slots"

// SlotKind says what happened to a slot.
type SlotKind string

// The slot signals.
const (
	// SlotFreed: a session ended, or a reserved login failed.
	SlotFreed SlotKind = "freed"
	// SlotLanded: an admitted login became a session in pg_stat_activity.
	SlotLanded SlotKind = "landed"
)

// SlotEvent is one signal from another instance: Count slots of Role and
// Database changed as Kind says.
type SlotEvent struct {
	Kind     SlotKind
	Role     string
	Database string
	Count    int
}

// slotPayload is a signal as NOTIFY carries it (JSON: names may hold any
// character but NUL).
type slotPayload struct {
	Instance string   `json:"i"`
	Kind     SlotKind `json:"k"`
	Role     string   `json:"r"`
	Database string   `json:"d"`
	Count    int      `json:"n"`
}

// signalQueueMax bounds the distinct signals waiting to be sent; more are
// dropped (the waiters elsewhere find the slots at their next re-check).
const signalQueueMax = 1024

// signals is Control's state for slot signals.
type signals struct {
	instance string // this instance's tag: it ignores its own signals

	mu      sync.Mutex
	pending map[slotKey]int // signals not sent yet, coalesced
	order   []slotKey       // in the order they came
	wake    chan struct{}   // capacity 1: the sender has work
	running bool            // ListenSlots runs: signals are sent

	listening atomic.Bool // the listening connection has run LISTEN and is up

	// The registration (instances.go): set by SetInstance, carried by the
	// listening connection, whose backend is listenPID while it is up.
	tag        byte
	advertise  string
	registered bool
	listenPID  uint32
}

// SlotListening reports whether this instance hears the other instances'
// slot signals now (ListenSlots runs and its connection is up).
func (c *Control) SlotListening() bool { return c.signals.listening.Load() }

type slotKey struct {
	kind           SlotKind
	role, database string
}

func (s *signals) init() {
	var b [8]byte
	_, _ = rand.Read(b[:])
	s.instance = hex.EncodeToString(b[:])
	s.wake = make(chan struct{}, 1)
}

// SignalSlot tells the other instances that a slot of role and database
// changed as kind says. It never blocks: the signal is queued, coalesced
// with others of the same slot, and sent by ListenSlots' sender; without a
// ListenSlots running, or with the queue full, it is dropped.
func (c *Control) SignalSlot(kind SlotKind, role, database string) {
	s := &c.signals
	k := slotKey{kind, controlText(role), controlText(database)}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running {
		return
	}
	if _, ok := s.pending[k]; !ok {
		if len(s.order) >= signalQueueMax {
			return
		}
		s.order = append(s.order, k)
	}
	s.pending[k]++
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Reconnection back-off of the listening connection.
const (
	listenRetryMin = 100 * time.Millisecond
	listenRetryMax = 10 * time.Second
)

// ListenSlots sends this instance's slot signals and hands every other
// instance's to handle, until ctx ends; then it returns, with both of its
// goroutines ended. It listens on a connection of its own (not the pool's:
// it is held for good), which it opens again after a failure, backing off;
// failures go to onError, once per failed connection. handle runs on the
// listening goroutine and must not block.
func (c *Control) ListenSlots(ctx context.Context, handle func(SlotEvent), onError func(error)) {
	s := &c.signals
	s.mu.Lock()
	s.running, s.pending, s.order = true, map[slotKey]int{}, nil
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running, s.pending, s.order = false, nil, nil
		s.mu.Unlock()
	}()
	var wg sync.WaitGroup
	wg.Go(func() { c.sendSignals(ctx, onError) })
	defer wg.Wait()
	retry := listenRetryMin
	for ctx.Err() == nil {
		listened, err := c.listenOnce(ctx, handle)
		if ctx.Err() != nil {
			return
		}
		if listened {
			retry = listenRetryMin // it had worked: start the back-off over
		}
		onError(err)
		t := time.NewTimer(retry)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return
		}
		retry = min(2*retry, listenRetryMax)
	}
}

// listenOnce opens the listening connection and passes on what arrives
// until it fails or ctx ends; listened says it got as far as LISTEN (the
// connection was lost later, and is opened again after the shortest pause).
func (c *Control) listenOnce(ctx context.Context, handle func(SlotEvent)) (listened bool, err error) {
	cfg := c.pool.Config().ConnConfig.Copy()
	c.signals.mu.Lock()
	if c.signals.registered {
		cfg.RuntimeParams["application_name"] = instanceName(c.signals.tag, c.signals.advertise)
	}
	c.signals.mu.Unlock()
	cctx, cancel := context.WithTimeout(ctx, controlConnectTimeout)
	conn, err := pgx.ConnectConfig(cctx, cfg)
	cancel()
	if err != nil {
		return false, fmt.Errorf("slot signals: connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = conn.Close(cctx)
	}()
	if _, err := conn.Exec(ctx, "LISTEN "+slotChannel); err != nil {
		return false, fmt.Errorf("slot signals: listen: %w", err)
	}
	c.signals.mu.Lock()
	c.signals.listenPID = conn.PgConn().PID()
	c.signals.mu.Unlock()
	c.signals.listening.Store(true)
	defer func() {
		c.signals.listening.Store(false)
		c.signals.mu.Lock()
		c.signals.listenPID = 0
		c.signals.mu.Unlock()
	}()
	for {
		n, err := conn.WaitForNotification(ctx)
		if err != nil {
			return true, fmt.Errorf("slot signals: connection lost: %w", err)
		}
		var p slotPayload
		if json.Unmarshal([]byte(n.Payload), &p) != nil || p.Instance == c.signals.instance || p.Count <= 0 {
			continue // not a signal, or this instance's own
		}
		if p.Kind != SlotFreed && p.Kind != SlotLanded {
			continue
		}
		handle(SlotEvent{Kind: p.Kind, Role: p.Role, Database: p.Database, Count: p.Count})
	}
}

// controlConnectTimeout bounds opening the listening connection.
const controlConnectTimeout = 10 * time.Second

// sendSignals sends the queued signals, all that have gathered in one
// statement, until ctx ends. A failed send drops those signals.
func (c *Control) sendSignals(ctx context.Context, onError func(error)) {
	s := &c.signals
	for {
		select {
		case <-s.wake:
		case <-ctx.Done():
			return
		}
		s.mu.Lock()
		payloads := make([]string, 0, len(s.order))
		for _, k := range s.order {
			b, _ := json.Marshal(slotPayload{Instance: s.instance, Kind: k.kind, Role: k.role, Database: k.database, Count: s.pending[k]})
			payloads = append(payloads, string(b))
		}
		s.pending, s.order = map[slotKey]int{}, nil
		s.mu.Unlock()
		if len(payloads) == 0 {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, controlConnectTimeout)
		_, err := c.pool.Exec(qctx, "SELECT pg_catalog.pg_notify($1, p) FROM pg_catalog.unnest($2::text[]) AS p", slotChannel, payloads)
		cancel()
		if err != nil && ctx.Err() == nil {
			onError(fmt.Errorf("slot signals: notify: %w", err))
		}
	}
}
