// Command rolegate is a PostgreSQL proxy that enforces connection limits per role.
//
//	rolegate -config proxy.toml          run the proxy
//	rolegate -check -config proxy.toml   validate a configuration and exit
//	rolegate -version                    print the version and exit
//
// Signals: SIGTERM stops accepting and lets sessions finish for up to
// shutdown_timeout; SIGINT closes everything at once. With handoff_socket, a
// starting rolegate takes the listeners over from the running one, which
// then drains (handoff.go). main only wires packages together; the work
// happens in config, upstream and proxy.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rolegate/rolegate/admin"
	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/config"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
	"github.com/rolegate/rolegate/upstream"
)

// version is set at build time with -ldflags "-X main.version=..."; otherwise it
// comes from the module's build information.
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// Exit statuses: 2 for a usage or configuration error, 1 for a failure while running.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("rolegate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "proxy.toml", "configuration file")
	check := fs.Bool("check", false, "validate the configuration and exit")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "rolegate: unexpected arguments: %v\n", fs.Args())
		return 2
	}
	if *showVersion {
		fmt.Fprintf(stdout, "rolegate %s\n", buildVersion())
		return 0
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		fmt.Fprintf(stderr, "rolegate: %v\n", err)
		return 2
	}
	parts, err := components(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "rolegate: %s: %v\n", *cfgPath, err)
		return 2
	}
	defer parts.close()
	if *check {
		fmt.Fprintf(stdout, "%s: configuration is valid\n", *cfgPath)
		return 0
	}
	log := newLogger(cfg.Log, stderr)
	if err := serve(*cfgPath, cfg, parts, log); err != nil {
		log.Error("rolegate stopped", "err", err)
		return 1
	}
	return 0
}

// parts are what the configuration names, built and ready to wire.
type parts struct {
	dialer  *upstream.Dialer
	tls     *tls.Config
	control *upstream.Control // nil without [control] dsn
	auth    *proxy.ClientAuth // nil in passthrough mode
	limits  *proxy.Limits     // nil without limits (or without proxy mode)
	history *upstream.History // nil until openHistory finds the table usable
}

func (p *parts) close() {
	if p.history != nil {
		p.history.Close() // before the pool it writes on
	}
	if p.control != nil {
		p.control.Close()
	}
}

// historyCheckTimeout bounds the start-up check of the history table.
const historyCheckTimeout = 10 * time.Second

// openHistory starts the eviction history on the server ([history]) when
// there is a control connection and keep is not off. When the table cannot
// be used it says why, once, and the events stay in memory.
func (p *parts) openHistory(cfg *config.Config, log *slog.Logger) {
	keep := cfg.History.Keep.Value()
	switch {
	case keep == 0:
		log.Info("eviction history: kept in memory ([history] keep = \"off\")")
		return
	case p.control == nil:
		log.Info("eviction history: kept in memory (the table needs [control] dsn)")
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), historyCheckTimeout)
	defer cancel()
	h, err := p.control.OpenHistory(ctx, upstream.HistoryOptions{Keep: keep, Logger: log})
	if err != nil {
		log.Warn("eviction history: table rolegate.events unusable; keeping the history in memory (run sql/setup.sql, then restart)",
			"err", err)
		return
	}
	p.history = h
	log.Info("eviction history: table rolegate.events", "keep", keep)
}

// components builds what the configuration names and can fail on: files are read
// here so that -check catches a missing certificate or userlist. The control
// pool connects lazily, so -check does not need the server.
func components(cfg *config.Config) (*parts, error) {
	p := &parts{}
	var err error
	if p.dialer, err = upstream.NewDialer(cfg.Server); err != nil {
		return nil, err
	}
	if cfg.TLS.Enabled() {
		cert, err := tls.LoadX509KeyPair(cfg.TLS.Cert, cfg.TLS.Key)
		if err != nil {
			return nil, fmt.Errorf("tls: load certificate: %w", err)
		}
		p.tls = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	if cfg.Control.DSN != "" {
		if p.control, err = upstream.NewControl(context.Background(), cfg.Control, cfg.Auth.AuthQuery); err != nil {
			return nil, err
		}
	}
	if cfg.LimitsConfigured() {
		if p.control == nil {
			p.close()
			return nil, errors.New("limits need [control] dsn: rolegate counts sessions in pg_stat_activity")
		}
		p.limits = &proxy.Limits{
			Limiter: limiter.New(time.Now),
			Server:  p.control,
		}
		p.limits.SetRules(cfg, cfg.Limits.ServerLimits, cfg.Limits.LimitsCacheTTL.Value())
	}
	if cfg.Auth.Mode != config.AuthProxy {
		return p, nil
	}
	var sources []auth.Source
	if cfg.Auth.Userlist != "" {
		users, err := auth.LoadUserlist(cfg.Auth.Userlist)
		if err != nil {
			p.close()
			return nil, err
		}
		sources = append(sources, users)
	}
	if p.control != nil {
		sources = append(sources, auth.SourceFunc(p.control.Secret))
	}
	// Password lookups take at most half the control pool, so that a flood
	// of logins cannot starve the census and the admission locks.
	store := auth.NewStoreWith(auth.StoreOptions{Size: cfg.Auth.CacheSize, TTL: cfg.Auth.CacheTTL.Value(),
		MaxFetches: max(1, cfg.Control.MaxConns/2)}, sources...)
	p.auth = &proxy.ClientAuth{
		Store:               store,
		Method:              cfg.Auth.Method,
		CleartextWithoutTLS: cfg.Auth.CleartextWithoutTLS,
		LookupTimeout:       cfg.Server.ConnectTimeout.Value(),
	}
	return p, nil
}

// clusterOf is this instance's part among the rolegate instances on the
// same server, when it has limits (and so a control connection): a tag that
// no live instance holds, picked at random. Without the list (the server is
// down at start) a random tag is still right 255 times in 256; a clash
// only misroutes cancels between the two instances that share it.
func clusterOf(p *parts, cfg *config.Config, log *slog.Logger) *proxy.Cluster {
	if p.limits == nil || p.control == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	used := map[byte]bool{}
	list, err := p.control.Instances(ctx)
	if err != nil {
		log.Warn("could not list the other rolegate instances; picking an instance tag at random", "err", err)
	}
	for _, in := range list {
		used[in.Tag] = true
	}
	var free []byte
	for t := range 256 {
		if !used[byte(t)] {
			free = append(free, byte(t))
		}
	}
	if len(free) == 0 {
		log.Warn("256 rolegate instances are registered on the server; sharing an instance tag")
		free = []byte{0}
	}
	var b [1]byte
	_, _ = rand.Read(b[:])
	c := &proxy.Cluster{Tag: free[int(b[0])%len(free)], Advertise: cfg.Cluster.Advertise, Version: buildVersion()}
	log.Info("instance", "tag", fmt.Sprintf("%02x", c.Tag), "instances", len(list), "advertise", c.Advertise)
	return c
}

func serve(cfgPath string, cfg *config.Config, p *parts, log *slog.Logger) error {
	// With a hand-off socket, a running rolegate hands its listeners over
	// (handoff.go); without one answering, listen afresh.
	var tk *takeover
	if cfg.HandoffSocket != "" {
		var err error
		if tk, err = takeOver(cfg.HandoffSocket, cfg); err != nil {
			return err
		}
	}
	var ln, adminLn net.Listener
	var hln *net.UnixListener
	if tk != nil {
		ln, adminLn = tk.proxy, tk.admin
	} else {
		// The hand-off socket first: once clients can connect, a successor
		// can find it too.
		var err error
		if cfg.HandoffSocket != "" {
			if hln, err = listenHandoff(cfg.HandoffSocket); err != nil {
				return err
			}
		}
		if ln, err = listenTCP(cfg.Listen, cfg.ReusePort); err != nil {
			if hln != nil {
				hln.Close()
			}
			return fmt.Errorf("listen on %s: %w", cfg.Listen, err)
		}
	}
	// fail undoes what is set up before serving: a successor that cannot
	// serve tells the old process, which goes on.
	fail := func(err error) error {
		if tk != nil {
			tk.abort(err)
		} else {
			ln.Close()
		}
		if hln != nil {
			hln.Close()
		}
		return err
	}
	metrics := admin.NewMetrics() // the proxy counts into it; /metrics serves it
	p.openHistory(cfg, log)
	var history proxy.History
	if p.history != nil {
		history = p.history
	}
	srv := proxy.New(proxy.Config{
		Upstream:        p.dialer,
		TLS:             p.tls,
		Auth:            p.auth,
		Limits:          p.limits,
		ConsoleDatabase: cfg.Admin.Database,
		ConsoleUsers:    cfg.Admin.Users,
		StartupTimeout:  cfg.StartupTimeout.Value(),
		Relay:           cfg.Relay,
		Logger:          log,
		Observer:        metrics,
		Cluster:         clusterOf(p, cfg, log),
		Instance:        cfg.Instance,
		History:         history,
	})
	if cfg.MaxProcs > 0 {
		runtime.GOMAXPROCS(cfg.MaxProcs)
	}
	log.Info("rolegate started", "version", buildVersion(), "listen", ln.Addr().String(),
		"server", cfg.Server.Address, "sslmode", cfg.Server.SSLMode, "client_tls", p.tls != nil, "auth", cfg.Auth.Mode,
		"max_procs", runtime.GOMAXPROCS(0), "relay", srv.RelayMode(), "reuse_port", cfg.ReusePort, "instance", srv.Instance())
	if tk != nil {
		log.Info("took the listeners over from the running rolegate", "pid", tk.from, "admin_http", tk.admin != nil)
	}

	if cfg.Auth.Mode == config.AuthPassthrough && p.limits != nil {
		log.Info("passthrough mode: limits apply once the server has authenticated a login; " +
			"a login refused by the server's own limit cannot be retried")
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)

	rl := &reloader{path: cfgPath, p: p, log: log}
	rl.cur.Store(cfg)
	stops := make(chan stopRequest, 1) // SHUTDOWN [WAIT] from the console or the HTTP API
	rl.stop = func(wait bool, by string) {
		select {
		case stops <- stopRequest{wait: wait, by: by}:
		default: // one is being acted on already
		}
	}
	srv.SetConsole(admin.NewConsole(consoleOptions(p, srv, rl, metrics, log)))
	adminLn, stopAdmin, err := startAdmin(cfg, p, srv, rl, metrics, log, adminLn)
	if err != nil {
		return fail(err)
	}
	defer stopAdmin()

	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	if tk != nil {
		// The old process stops accepting once told; then the path is ours.
		released, err := tk.commit()
		if err != nil || !released {
			log.Warn("the old rolegate did not confirm the hand-off", "pid", tk.from, "err", err)
		}
		if hln, err = listenHandoff(cfg.HandoffSocket); err != nil {
			log.Error("no hand-off socket; the next restart cannot take over from this process", "err", err)
		}
	}
	var taken <-chan int // the successor's pid, once it serves on our listeners
	if hln != nil {
		hs := newHandoffServer(hln, cfg, ln, adminLn, log)
		defer hs.stop()
		taken = hs.taken
	}
	timeout := cfg.ShutdownTimeout.Value()
	for {
		select {
		case err := <-served:
			srv.Close()
			if errors.Is(err, proxy.ErrServerClosed) {
				return nil
			}
			return err
		case pid := <-taken:
			log.Info("handed the listeners over to a new rolegate; draining sessions", "pid", pid, "timeout", timeout)
			stopAdmin() // the successor answers on the admin address now
			return drain(srv, sigs, stops, served, timeout, 1, log)
		case r := <-stops:
			if !r.wait {
				log.Info("SHUTDOWN requested; closing all sessions now", "by", r.by)
				srv.Close()
				return waitServe(served)
			}
			log.Info("SHUTDOWN WAIT requested; draining sessions", "by", r.by, "timeout", timeout)
			if hln != nil {
				hln.Close() // a draining process has nothing to hand over
			}
			return drain(srv, sigs, stops, served, timeout, 0, log)
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				_ = rl.reload("SIGHUP") // logged; the old configuration stays on error
			case syscall.SIGINT:
				log.Info("SIGINT received; closing all sessions now")
				srv.Close()
				return waitServe(served)
			case syscall.SIGTERM:
				log.Info("SIGTERM received; draining sessions", "timeout", timeout)
				if hln != nil {
					hln.Close() // a draining process has nothing to hand over
				}
				return drain(srv, sigs, stops, served, timeout, 0, log)
			}
		}
	}
}

// stopRequest is a SHUTDOWN from the console or the HTTP API: wait is
// SIGTERM's drain, else SIGINT's close now.
type stopRequest struct {
	wait bool
	by   string
}

// drain stops accepting and lets the sessions finish for up to timeout, then
// closes the rest. While it drains, a SIGINT or a SHUTDOWN (without WAIT)
// closes at once, and so does a SIGTERM after the first patience of them (a
// drain that a hand-off started lets the SIGTERM a service manager sends go
// by).
func drain(srv *proxy.Server, sigs chan os.Signal, stops <-chan stopRequest, served <-chan error, timeout time.Duration,
	patience int, log *slog.Logger) error {
	go func() {
		for {
			select {
			case sig, ok := <-sigs:
				switch {
				case !ok:
					return
				case sig == syscall.SIGHUP:
				case sig == syscall.SIGTERM && patience > 0:
					patience--
					log.Info("SIGTERM received; draining already (a second SIGTERM or a SIGINT closes at once)")
				default:
					srv.Close()
					return
				}
			case r := <-stops:
				if r.wait {
					log.Info("SHUTDOWN WAIT requested; draining already (SHUTDOWN closes at once)", "by", r.by)
					continue
				}
				log.Info("SHUTDOWN requested while draining; closing all sessions now", "by", r.by)
				srv.Close()
				return
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	err := srv.Shutdown(ctx)
	cancel()
	if err != nil {
		log.Warn("shutdown timeout reached; closed the remaining sessions")
	}
	signal.Stop(sigs)
	close(sigs)
	return waitServe(served)
}

// consoleOptions are what the psql admin console reads and steers.
func consoleOptions(p *parts, srv *proxy.Server, rl *reloader, metrics *admin.Metrics, log *slog.Logger) admin.Options {
	o := admin.Options{Proxy: srv, Reload: rl.reload, ConfigText: rl.configText, Version: buildVersion(), Logger: log,
		Metrics: metrics, Shutdown: rl.stop}
	if p.limits != nil {
		o.Limiter = p.limits.Limiter.Snapshot
		o.Override = p.limits.Override
		o.OverrideDryRun = p.limits.OverrideDryRun
		o.Overrides = p.limits.Overrides
		o.Effective = p.limits.Effective
	}
	if p.control != nil {
		o.ServerSessions = p.control.Sessions
	}
	if p.limits != nil && p.control != nil {
		o.Explain = srv.Explain
		o.Instances = srv.Instances
	}
	o.ConfiguredRoles = func() []string {
		if cfg := rl.cur.Load(); cfg != nil {
			return slices.Sorted(maps.Keys(cfg.Roles))
		}
		return nil
	}
	o.ConfiguredDatabases = func() []string {
		if cfg := rl.cur.Load(); cfg != nil {
			return slices.Sorted(maps.Keys(cfg.Databases))
		}
		return nil
	}
	return o
}

// startAdmin starts the admin HTTP server when [admin] http is set, on ln
// (handed over by the previous process) or else on a listener of its own,
// and returns the listener and the function that stops the server and waits
// for its goroutine (once; later calls return at once). An address it cannot
// listen on stops rolegate, as the proxy's own listen address does: an
// operator who configured it expects to find it.
func startAdmin(cfg *config.Config, p *parts, srv *proxy.Server, rl *reloader, metrics *admin.Metrics, log *slog.Logger,
	ln net.Listener) (_ net.Listener, stop func(), err error) {
	if cfg.Admin.HTTP == "" {
		if ln != nil {
			ln.Close()
		}
		return nil, func() {}, nil
	}
	if ln == nil {
		if ln, err = net.Listen("tcp", cfg.Admin.HTTP); err != nil {
			return nil, nil, fmt.Errorf("admin http: listen on %s: %w", cfg.Admin.HTTP, err)
		}
	}
	opts := consoleOptions(p, srv, rl, metrics, log)
	opts.Ready = admin.DialReady(p.dialer)
	opts.Token = cfg.AdminToken()
	opts.Addr, opts.AllowedHosts = cfg.Admin.HTTP, cfg.Admin.AllowedHosts
	if p.control != nil {
		opts.Ready = admin.PingReady(p.control)
	}
	h := admin.New(opts)
	log.Info("admin HTTP server started", "listen", ln.Addr().String(), "token", opts.Token != "",
		"allowed_hosts", opts.AllowedHosts)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := h.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin HTTP server stopped", "err", err)
		}
	}()
	return ln, sync.OnceFunc(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := h.Shutdown(ctx); err != nil {
			_ = h.Close()
		}
		<-done
	}), nil
}

// reloader re-reads the configuration for new logins: limits and policies,
// on SIGHUP and for the admin API, one at a time.
type reloader struct {
	mu   sync.Mutex
	path string
	p    *parts
	log  *slog.Logger
	cur  atomic.Pointer[config.Config] // the configuration last loaded, for SHOW CONFIG
	// stop asks serve for SHUTDOWN [WAIT] (admin.Options.Shutdown).
	stop func(wait bool, by string)
}

// configText is the configuration in force, secrets redacted.
func (r *reloader) configText() string { return r.cur.Load().Redacted() }

// reload re-reads the file; by says who asked. A bad file keeps the old
// configuration and is returned; no session is touched either way. Each
// reload is one log line.
func (r *reloader) reload(by string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	cfg, err := config.Load(r.path)
	if err != nil {
		r.log.Error("reload failed; keeping the previous configuration", "by", by, "err", err)
		return err
	}
	if r.p.limits == nil {
		r.cur.Store(cfg)
		r.log.Info("reloaded; no limits are enforced (limits, and the settings other than limits, take effect on restart)", "by", by)
		return nil
	}
	if r.p.control != nil {
		r.p.control.ForgetLimits()
	}
	r.p.limits.SetRules(cfg, cfg.Limits.ServerLimits, cfg.Limits.LimitsCacheTTL.Value())
	r.cur.Store(cfg)
	r.log.Info("reloaded limits and policies for new logins", "by", by, "server_limits_cache", "cleared")
	return nil
}

func waitServe(served <-chan error) error {
	if err := <-served; err != nil && !errors.Is(err, proxy.ErrServerClosed) {
		return err
	}
	return nil
}

func newLogger(cfg config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.Level)) // config.Parse checked it
	opts := &slog.HandlerOptions{Level: level}
	if cfg.Format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

func buildVersion() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := info.Main.Version
	for _, s := range info.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " (" + s.Value[:12] + ")"
		}
	}
	return v
}
