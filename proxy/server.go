// Package proxy is rolegate's client side: it accepts PostgreSQL connections,
// negotiates startup and TLS, forwards cancel requests, logs the client in to the
// server, and relays the session. Its lifecycle follows net/http.Server: Serve,
// Shutdown (drain) and Close (now).
package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rolegate/rolegate/internal/evloop"
	"github.com/rolegate/rolegate/upstream"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// errShutdown is the cause recorded for sessions closed by Shutdown or Close.
var errShutdown = errors.New("rolegate is shutting down")

// Config is what a Server needs; cmd/rolegate builds it from proxy.toml.
type Config struct {
	// Upstream dials the PostgreSQL server.
	Upstream *upstream.Dialer
	// TLS, when not nil, is offered to clients (SSLRequest and direct TLS).
	TLS *tls.Config
	// Auth, when not nil, makes rolegate authenticate clients itself and log in
	// to the server with their recovered keys (proxy mode); nil relays the
	// authentication exchange (passthrough).
	Auth *ClientAuth
	// Limits, when not nil, enforces connection limits per role and database.
	// It needs Auth: only a client that proved who it is may count or evict.
	Limits *Limits
	// ConsoleDatabase is the database name that opens the admin console
	// instead of a server session ("rolegate" by default), for the roles in
	// ConsoleUsers; the console itself is installed with SetConsole.
	ConsoleDatabase string
	ConsoleUsers    []string
	// StartupTimeout bounds startup and authentication of a client.
	StartupTimeout time.Duration
	// Relay is RelayLoop (or "") or RelayGoroutines: how logged-in
	// sessions are relayed.
	Relay string
	// Logger receives one line per login, session end and failure; repeated
	// failures are rate-limited per kind and role. nil: slog.Default().
	Logger *slog.Logger
	// Observer is told of logins, failures, waits, server dials and finished
	// sessions, for metrics. nil: nothing is observed.
	Observer Observer
	// Cluster, when not nil, registers this instance on the server and
	// takes CancelRequests to the instance that issued their key; it needs
	// Limits with a control connection (upstream.Control). New copies it.
	Cluster *Cluster
	// Instance names this rolegate in the events it records, which the
	// History shares with other instances. "": New picks a random
	// 8-hex-digit tag (Server.Instance).
	Instance string
	// History, when not nil, receives every event the Server records and
	// answers Server.History with every instance's; nil keeps the events
	// in memory only.
	History History

	// throttle sets the rate limit of repeated-failure log lines; tests only
	// (zero: the defaults).
	throttle throttleOptions
	// poll is the first waiter's re-check interval; tests only (zero:
	// waitPoll).
	poll time.Duration
}

// Server accepts and serves client connections.
type Server struct {
	cfg      Config
	log      *slog.Logger
	obs      Observer     // never nil
	quiet    *logThrottle // repeated failures; successes are always logged
	registry *registry
	pending  pendingLogins // passthrough logins not yet admitted
	gates    gates         // roles and databases an operator paused or disabled (pause.go)
	events   eventLog
	started  time.Time     // when New ran, for the other instances
	peers    instanceCache // the live instances, for forwarding cancels
	// endPoint is the tls-server-end-point of the certificate TLS clients
	// get, for SCRAM channel binding; nil when it cannot be known.
	endPoint []byte
	console  atomic.Pointer[consoleBox]

	ctx      context.Context // parent of every connection's context; cancelled by Close
	cancel   context.CancelCauseFunc
	handlers sync.WaitGroup // one per connection being handled (handle)
	nextID   atomic.Uint64
	// loop relays plain TCP sessions once logged in; nil: goroutines relay
	// every session (Config.Relay). The first Serve starts it (startLoop),
	// so that a Server never served holds no goroutine.
	loop       atomic.Pointer[evloop.Loop]
	loopOnce   sync.Once
	loopFailed atomic.Bool
	// background runs the Server's own goroutines (slot signals from other
	// instances: listenSlots); Close waits for them.
	background sync.WaitGroup
	listenOnce sync.Once

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	closed    bool          // no more accepting
	stopped   bool          // Close: no new connections tracked, so handlers.Wait is final
	active    int           // connections being handled
	idle      chan struct{} // closed and replaced when active drops to 0 during Shutdown
}

// New returns a Server; call Serve to start accepting.
func New(cfg Config) *Server {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ConsoleDatabase == "" {
		cfg.ConsoleDatabase = "rolegate"
	}
	if cfg.TLS != nil {
		cfg.TLS = cfg.TLS.Clone()
		// PostgreSQL 17 direct TLS requires ALPN "postgresql"; clients using
		// SSLRequest may send it too.
		cfg.TLS.NextProtos = []string{"postgresql"}
	}
	if cfg.Cluster != nil {
		c := *cfg.Cluster // Serve may fill in Advertise
		cfg.Cluster = &c
	}
	if cfg.Instance == "" {
		cfg.Instance = newInstanceTag()
	}
	obs := cfg.Observer
	if obs == nil {
		obs = nopObserver{}
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	return &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		obs:       obs,
		quiet:     newLogThrottle(cfg.throttle),
		registry:  newRegistry(cfg.Cluster),
		started:   time.Now(),
		endPoint:  tlsEndPoint(cfg.TLS),
		ctx:       ctx,
		cancel:    cancel,
		listeners: make(map[net.Listener]struct{}),
	}
}

// Console serves the admin console on a connection rolegate has authenticated
// (package admin implements it). It owns the conversation until the client
// leaves or ctx ends; r holds what the client sent ahead. The greeting, up to
// the first ReadyForQuery, has been sent.
type Console interface {
	ServeConsole(ctx context.Context, conn net.Conn, r *bufio.Reader, user string) error
}

type consoleBox struct{ Console }

// SetConsole installs the admin console; it is separate from New because the
// console reads the Server's own snapshots.
func (s *Server) SetConsole(c Console) { s.console.Store(&consoleBox{c}) }

// RelayMode says how logged-in sessions are relayed: RelayLoop or
// RelayGoroutines.
func (s *Server) RelayMode() string {
	if s.cfg.Relay == RelayGoroutines || s.loopFailed.Load() {
		return RelayGoroutines
	}
	return RelayLoop
}

// startLoop starts the event loop, once, unless the configuration relays
// with goroutines; if the loop cannot start, goroutines relay every session.
func (s *Server) startLoop() {
	s.loopOnce.Do(func() {
		if s.cfg.Relay == RelayGoroutines {
			return
		}
		loop, err := evloop.New(evloop.Config{DrainTimeout: victimGoneTimeout, FarewellTimeout: shutdownNoticeTimeout})
		if err != nil {
			s.loopFailed.Store(true)
			s.log.Warn("event loop unavailable; relaying with goroutines", "err", err)
			return
		}
		s.loop.Store(loop)
	})
}

// Events returns the most recent evictions and rejections, newest first.
func (s *Server) Events() []Event { return s.events.recent() }

// Sessions returns a snapshot of the sessions that have logged in, oldest first.
func (s *Server) Sessions() []SessionInfo { return s.registry.snapshot() }

// Serve accepts connections on ln until Shutdown or Close, and returns
// ErrServerClosed then. Temporary accept errors are retried with a back-off.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	s.startLoop()
	s.listenSlots(ln.Addr())
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "delay", backoff)
				select {
				case <-time.After(backoff):
				case <-s.ctx.Done():
					return ErrServerClosed
				}
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		backoff = 0
		if !s.track(+1) {
			c.Close()
			return ErrServerClosed
		}
		go func() {
			if !s.handle(c) {
				s.track(-1)
			} // else the session's end on the event loop untracks it
		}()
	}
}

// track counts connections in handling; it refuses new ones once closed.
func (s *Server) track(delta int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if delta > 0 {
		if s.stopped {
			return false
		}
		s.handlers.Add(1)
		s.active++
		return true
	}
	s.active--
	s.handlers.Done()
	if s.active == 0 && s.idle != nil {
		close(s.idle)
		s.idle = nil
	}
	return true
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// closeListeners stops accepting; with stop, it also refuses to track new
// connections.
func (s *Server) closeListeners(stop bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.stopped = s.stopped || stop
	for ln := range s.listeners {
		ln.Close()
	}
}

// Shutdown stops accepting and waits for every connection to end. When ctx ends
// first, the remaining sessions are closed (as by Close) and ctx's error returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.closeListeners(false)
	for {
		s.mu.Lock()
		if s.active == 0 {
			s.mu.Unlock()
			s.Close()
			return nil
		}
		if s.idle == nil {
			s.idle = make(chan struct{})
		}
		idle := s.idle
		n := s.active
		s.mu.Unlock()
		s.log.Info("shutdown: waiting for sessions to end", "sessions", n)
		select {
		case <-idle:
		case <-ctx.Done():
			s.Close()
			return ctx.Err()
		}
	}
}

// Close stops accepting, closes every connection now and waits until their
// goroutines have ended. It is safe to call more than once.
func (s *Server) Close() error {
	s.closeListeners(true)
	s.cancel(errShutdown)
	s.loopOnce.Do(func() {}) // no loop starts after this
	loop := s.loop.Load()
	if loop != nil {
		loop.StopAll(errShutdown) // sessions on the loop have no context of their own
	}
	s.handlers.Wait()
	s.background.Wait()
	if loop != nil {
		loop.Close() // its sessions ended with their handlers
	}
	return nil
}
