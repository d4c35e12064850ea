package admin

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
	"github.com/rolegate/rolegate/upstream"
)

// Proxy is what admin needs from the proxy (proxy.Server implements it):
// copied snapshots of the sessions and the recent events, and kills.
type Proxy interface {
	Sessions() []proxy.SessionInfo
	Events() []proxy.Event
	// History is up to limit events, newest first: every instance's from
	// the history table when there is one, else this instance's.
	History(ctx context.Context, limit int) []proxy.Event
	Kill(ctx context.Context, pid uint32, by string) (bool, error)
}

// Options are an HTTP server's parts. Proxy is required; the rest may be nil.
type Options struct {
	Proxy Proxy
	// Limiter returns a snapshot of the limiter (limiter.Limiter.Snapshot);
	// nil when no limits are enforced.
	Limiter func() limiter.Snapshot
	// Ready reports whether rolegate can serve logins: nil error is ready.
	// See PingReady and DialReady. Nil: always ready.
	Ready func(ctx context.Context) error
	// Reload re-reads the configuration; by says who asked, for the log
	// line Reload writes. An error means the old configuration stays.
	// Nil: POST /api/reload answers 501.
	Reload func(by string) error
	// Token is the bearer token the mutating endpoints require; "" refuses
	// them all with 403.
	Token string
	// Addr is the configured listen address ([admin] http), host:port. When
	// its host is a name, requests with that name in Host are answered.
	Addr string
	// AllowedHosts are further names requests may carry in Host ([admin]
	// allowed_hosts): "name" on any port, "name:port" on that port. IP
	// addresses and localhost need no entry; any other name is answered
	// with 421 (see hostCheck).
	AllowedHosts []string

	Logger *slog.Logger
	// Metrics, when not nil, adds the proxy's Observer counts to /metrics.
	Metrics *Metrics
	// HistoryInterval is the time between two samples of the session
	// history (history.go); 0 is DefaultHistoryInterval.
	HistoryInterval time.Duration

	// The admin console (Console) also uses these; the HTTP server does not.

	// ConfigText returns the configuration as SHOW CONFIG prints it, secrets
	// already redacted. Nil: SHOW CONFIG answers 55000.
	ConfigText func() string
	// Version is what SHOW VERSION prints after "rolegate ".
	Version string
	// Override sets runtime overrides of a role's limit and policy until the
	// next reload (proxy.Limits.Override); a nil pointer leaves that part as
	// it is. Nil when no limits are enforced: SET answers 55000.
	Override func(role string, maxSessions *int, policy *limiter.Policy)
	// OverrideDryRun turns a role rule's dry run on or off until the next
	// reload (proxy.Limits.OverrideDryRun). Nil: SET POLICY cannot say DRY
	// RUN.
	OverrideDryRun func(role string, on bool)
	// Overrides returns a copy of the overrides in force (proxy.Limits.Overrides),
	// for SHOW ROLES. May be nil.
	Overrides func() map[string]proxy.Override

	// ServerSessions lists the server's client backends of roles, however
	// they were opened (upstream.Control.Sessions), so that sessions opened
	// outside rolegate show too. Nil without a control connection: only
	// rolegate's own sessions show.
	ServerSessions func(ctx context.Context, roles []string) ([]upstream.Backend, error)
	// Instances lists the rolegate instances on the same server with what
	// each says of itself (proxy.Server.Instances), for SHOW INSTANCES,
	// /api/instances and the instance column of the sessions. Nil without a
	// control connection: this instance alone, unnamed.
	Instances func(ctx context.Context) ([]proxy.InstanceInfo, error)
	// Effective returns the rules admission applies to role and database,
	// with the source of each limit (proxy.Limits.Effective). Nil when no
	// limits are enforced.
	Effective func(ctx context.Context, role, database string) (roleRule, dbRule limiter.Rule, roleSource, dbSource string, err error)
	// ConfiguredRoles names the roles with a rule in proxy.toml, so that
	// they show even before anyone logs in. May be nil.
	ConfiguredRoles func() []string
	// ConfiguredDatabases names the databases with a rule in proxy.toml, so
	// that SHOW DATABASES lists them before anyone connects. May be nil.
	ConfiguredDatabases func() []string
	// Explain tells what a login would get now (proxy.Server.Explain), for
	// EXPLAIN LOGIN and /api/explain. Nil without limits and a control
	// connection.
	Explain func(ctx context.Context, role, database, app, client string) (proxy.Explanation, error)
	// Shutdown stops rolegate as SIGTERM does (wait: drain for
	// shutdown_timeout) or SIGINT (close now); by says who asked. It must
	// not block: the console answers before its own session closes. Nil:
	// SHUTDOWN answers 55000, POST /api/shutdown 501.
	Shutdown func(wait bool, by string)
}

// ReadyTimeout bounds one readiness check.
const ReadyTimeout = 5 * time.Second

// PingReady is a readiness check through the control connection
// (upstream.Control implements the interface).
func PingReady(c interface{ Ping(context.Context) error }) func(context.Context) error {
	return func(ctx context.Context) error {
		if err := c.Ping(ctx); err != nil {
			return fmt.Errorf("control connection: %w", err)
		}
		return nil
	}
}

// DialReady is the readiness check without a control connection: a TCP (and,
// per sslmode, TLS) connection to the server, closed at once
// (upstream.Dialer implements the interface).
func DialReady(d interface {
	Dial(context.Context) (net.Conn, bool, error)
}) func(context.Context) error {
	return func(ctx context.Context) error {
		conn, _, err := d.Dial(ctx)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

// HTTP is the admin HTTP server. Its lifecycle is net/http.Server's: Serve
// returns http.ErrServerClosed after Shutdown or Close.
type HTTP struct {
	opts  Options
	log   *slog.Logger
	token [sha256.Size]byte // hash of opts.Token, compared in constant time
	hosts *hostCheck
	srv   *http.Server
	// sampler takes the session history (history.go); Serve runs it.
	sampler *sampler

	// Refused requests are logged at most once per refusedLogEvery for each
	// reason, with the number left out since the last line.
	refusedToken rateLog
	refusedHost  rateLog
}

const refusedLogEvery = 10 * time.Second

// New builds the server; it serves once Serve is called.
func New(opts Options) *HTTP {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	h := &HTTP{opts: opts, log: opts.Logger.With("component", "admin-http"), token: sha256.Sum256([]byte(opts.Token)),
		hosts: newHostCheck(opts.Addr, opts.AllowedHosts)}
	h.sampler = newSampler(opts, h.log)

	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{proxy: opts.Proxy, limiter: opts.Limiter},
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if opts.Metrics != nil { // the Observer's counts, when the proxy has one
		reg.MustRegister(opts.Metrics)
	}

	mux := http.NewServeMux()
	// A pattern with a method answers 405 (with Allow) to the others; GET
	// patterns also serve HEAD.
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { text(w, http.StatusOK, "ok") })
	mux.HandleFunc("GET /readyz", h.readyz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog: slog.NewLogLogger(h.log.Handler(), slog.LevelWarn),
	}))
	mux.HandleFunc("GET /api/sessions", h.sessions)
	mux.HandleFunc("GET /api/evictions", h.evictions)
	mux.HandleFunc("GET /api/roles", h.roles)
	mux.HandleFunc("GET /api/instances", h.instances)
	mux.HandleFunc("GET /api/explain", h.explain)
	mux.HandleFunc("GET /api/history", h.historyHandler)
	mux.HandleFunc("POST /api/sessions/{pid}/terminate", h.authorized(h.terminate))
	mux.HandleFunc("POST /api/reload", h.authorized(h.reload))
	h.registerVerbs(mux)
	h.registerPage(mux) // the live page at / (page.go)

	h.srv = &http.Server{
		Handler:           h.checkHost(mux), // every endpoint, before its method, path or token is looked at
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(h.log.Handler(), slog.LevelWarn),
	}
	return h
}

// Serve accepts connections on ln until Shutdown or Close, and then returns
// http.ErrServerClosed. Meanwhile it samples the session history, and stops
// sampling before it returns.
func (h *HTTP) Serve(ln net.Listener) error {
	ctx, cancel := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		h.sampler.run(ctx)
	}()
	defer func() {
		cancel()
		<-sampled
	}()
	return h.srv.Serve(ln)
}

// Shutdown stops accepting and waits for requests in flight, up to ctx.
func (h *HTTP) Shutdown(ctx context.Context) error { return h.srv.Shutdown(ctx) }

// Close stops at once. It is safe to call more than once.
func (h *HTTP) Close() error { return h.srv.Close() }

func (h *HTTP) readyz(w http.ResponseWriter, r *http.Request) {
	if h.opts.Ready == nil {
		text(w, http.StatusOK, "ready")
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), ReadyTimeout)
	defer cancel()
	if err := h.opts.Ready(ctx); err != nil {
		text(w, http.StatusServiceUnavailable, "not ready: "+err.Error())
		return
	}
	text(w, http.StatusOK, "ready")
}

// session is one session in /api/sessions. A login in flight through
// rolegate (state startup, authenticating, waiting or connecting) has no pid
// until the server sent it, and no role, database or application_name until
// the client proved who it is.
type session struct {
	ID              uint64    `json:"id"`
	PID             uint32    `json:"pid"` // the server's backend pid; 0 before the server sent it
	Role            string    `json:"role"`
	Database        string    `json:"database"`
	ApplicationName string    `json:"application_name"`
	ClientAddr      string    `json:"client_addr"`
	ClientTLS       bool      `json:"client_tls"`
	ServerTLS       bool      `json:"server_tls"`
	Replication     bool      `json:"replication"`
	State           string    `json:"state"`
	Wait            string    `json:"wait,omitempty"` // state waiting: what for, e.g. `waiting for a slot of role "app" (limit 3, 2nd in line)`
	Started         time.Time `json:"started"`
	LastActivity    time.Time `json:"last_activity"`
	BytesIn         int64     `json:"bytes_in"`
	BytesOut        int64     `json:"bytes_out"`
	ViaRolegate     bool      `json:"via_rolegate"`       // false: opened directly against the server (or another instance)
	Instance        string    `json:"instance,omitempty"` // the tag of the rolegate instance that relays it; "" when none does (or no cluster)

	inFlight   bool // a login in flight through rolegate: it holds no slot yet
	unverified bool // ... whose client has not proved who it is
}

func (h *HTTP) sessions(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	writeJSON(w, http.StatusOK, h.opts.allSessions(ctx, h.opts.Proxy.Sessions()))
}

// instance is one rolegate instance in /api/instances.
type instance struct {
	Tag        string    `json:"tag"`
	Name       string    `json:"name,omitempty"` // its name in the eviction history
	Address    string    `json:"address"`
	Self       bool      `json:"self"`
	Version    string    `json:"version,omitempty"`
	Started    time.Time `json:"started"`
	Registered time.Time `json:"registered"`
	Sessions   int       `json:"sessions"`
	Error      string    `json:"error,omitempty"` // why it did not answer
}

func (h *HTTP) instances(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	list, err := h.opts.instances(ctx)
	if err != nil {
		text(w, http.StatusServiceUnavailable, "cannot list the instances: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, list)
}

// event is one eviction, rejection or kill in /api/evictions.
type event struct {
	Time         time.Time `json:"time"`
	Instance     string    `json:"instance,omitempty"` // the rolegate instance that decided
	Kind         string    `json:"kind"`               // eviction | rejection | kill | wait (dry run only)
	DryRun       bool      `json:"dry_run"`            // decided by a dry-run rule and not carried out
	Role         string    `json:"role,omitempty"`
	Database     string    `json:"database,omitempty"`
	Client       string    `json:"client,omitempty"`
	Policy       string    `json:"policy,omitempty"`
	Scope        string    `json:"scope,omitempty"`
	VictimPID    uint32    `json:"victim_pid,omitempty"`
	VictimRole   string    `json:"victim_role,omitempty"`
	VictimClient string    `json:"victim_client,omitempty"`
	ViaRolegate  bool      `json:"via_rolegate"`
	Reason       string    `json:"reason,omitempty"`
	// The victim's application_name (known when rolegate relays it), age
	// (since backend_start) and idle time, in seconds; left out when unknown.
	VictimApplicationName string   `json:"victim_application_name,omitempty"`
	VictimAge             *float64 `json:"victim_age_seconds,omitempty"`
	VictimIdle            *float64 `json:"victim_idle_seconds,omitempty"`
}

// EventsShown is how many events SHOW EVICTIONS, /api/evictions and the
// live page show: as many as one instance keeps in memory.
const EventsShown = 256

func (h *HTTP) evictions(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	writeJSON(w, http.StatusOK, h.events(ctx))
}

// events is the eviction history, newest first, as the API shows it: every
// instance's from the history table when rolegate has one, else this
// instance's (proxy.Server.History).
func (h *HTTP) events(ctx context.Context) []event {
	events := h.opts.Proxy.History(ctx, EventsShown)
	out := make([]event, 0, len(events))
	for _, e := range events {
		out = append(out, event{
			Time: e.Time, Instance: e.Instance, Kind: e.Kind, DryRun: e.DryRun, Role: e.Role, Database: e.Database, Client: e.Client,
			Policy: e.Policy, Scope: e.Scope, VictimPID: e.VictimPID, VictimRole: e.VictimRole,
			VictimClient: e.VictimClient, ViaRolegate: e.ViaRolegate, Reason: e.Reason,
			VictimApplicationName: e.VictimApplicationName, VictimAge: seconds(e.VictimAge), VictimIdle: seconds(e.VictimIdle),
		})
	}
	return out
}

// seconds is d in seconds, or nil for 0 (unknown).
func seconds(d time.Duration) *float64 {
	if d <= 0 {
		return nil
	}
	v := d.Seconds()
	return &v
}

// role is one role in /api/roles: its sessions through rolegate, its waiting
// logins, and the limiter's counters under each policy that decided for it.
type role struct {
	Role              string    `json:"role"`
	Sessions          int       `json:"sessions"`           // held through this rolegate now
	SessionsElsewhere int       `json:"sessions_elsewhere"` // opened outside rolegate (needs a control connection)
	Waiting           int       `json:"waiting"`
	Limit             *int      `json:"limit"`                  // effective limit; null: none (or unknown)
	LimitSource       string    `json:"limit_source,omitempty"` // proxy.toml | server | override | none
	Policy            string    `json:"policy,omitempty"`       // the policy a login at the limit meets
	Policies          []counter `json:"policies"`
	// Thrashing is set while the role limit's eviction budget
	// (max_evictions) is spent: its fallback decides, and Evictors are the
	// clients that spent it (application_name@address).
	Thrashing bool     `json:"thrashing"`
	Evictors  []string `json:"evictors,omitempty"`
	Paused    bool     `json:"paused"`   // an operator's PAUSE: new logins wait
	Disabled  bool     `json:"disabled"` // an operator's DISABLE: new logins are refused
}

type counter struct {
	Policy        string `json:"policy"`
	Admitted      uint64 `json:"admitted"`
	Evictions     uint64 `json:"evictions"`
	EvictFailures uint64 `json:"evict_failures"`
	Rejections    uint64 `json:"rejections"`
	Waits         uint64 `json:"waits"`
	WaitTimeouts  uint64 `json:"wait_timeouts"`
	// What a dry-run rule would have done, and did not.
	DryRunEvictions  uint64 `json:"dry_run_evictions"`
	DryRunRejections uint64 `json:"dry_run_rejections"`
	DryRunWaits      uint64 `json:"dry_run_waits"`
	// BudgetFallbacks: the fallback decided because max_evictions was spent.
	BudgetFallbacks uint64 `json:"budget_fallbacks"`
}

// counterOf is the limiter's counters of one policy as the API shows them.
func counterOf(policy limiter.Policy, c limiter.Counters) counter {
	return counter{Policy: string(policy), Admitted: c.Admitted, Evictions: c.Evictions, EvictFailures: c.EvictFailures,
		Rejections: c.Rejections, Waits: c.Waits, WaitTimeouts: c.WaitTimeouts, DryRunEvictions: c.DryRunEvictions,
		DryRunRejections: c.DryRunRejections, DryRunWaits: c.DryRunWaits, BudgetFallbacks: c.BudgetFallbacks}
}

// sum adds counters up across policies; the result has no policy.
func sum(cs []counter) counter {
	var t counter
	for _, c := range cs {
		t.Admitted += c.Admitted
		t.Evictions += c.Evictions
		t.EvictFailures += c.EvictFailures
		t.Rejections += c.Rejections
		t.Waits += c.Waits
		t.WaitTimeouts += c.WaitTimeouts
		t.DryRunEvictions += c.DryRunEvictions
		t.DryRunRejections += c.DryRunRejections
		t.DryRunWaits += c.DryRunWaits
		t.BudgetFallbacks += c.BudgetFallbacks
	}
	return t
}

func (h *HTTP) roles(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	infos := h.opts.Proxy.Sessions()
	writeJSON(w, http.StatusOK, h.opts.roleViews(ctx, infos, h.opts.allSessions(ctx, infos)))
}

func (h *HTTP) terminate(w http.ResponseWriter, r *http.Request) {
	pid, err := strconv.ParseUint(r.PathValue("pid"), 10, 32)
	if err != nil || pid == 0 {
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid pid %q", r.PathValue("pid")))
		return
	}
	// proxy.Server.Kill writes the log line: pid, who asked, and the session.
	ok, err := h.opts.Proxy.Kill(r.Context(), uint32(pid), "http api from "+r.RemoteAddr)
	switch {
	case errors.Is(err, proxy.ErrNoControl):
		writeError(w, http.StatusServiceUnavailable, err.Error())
	case err != nil:
		writeError(w, http.StatusBadGateway, err.Error())
	case !ok:
		writeError(w, http.StatusNotFound, fmt.Sprintf("no server backend with pid %d", pid))
	default:
		writeJSON(w, http.StatusOK, map[string]any{"terminated": true, "pid": pid})
	}
}

func (h *HTTP) reload(w http.ResponseWriter, r *http.Request) {
	if h.opts.Reload == nil {
		writeError(w, http.StatusNotImplemented, "reload is not available")
		return
	}
	// Reload writes the log line, success or failure, with who asked.
	if err := h.opts.Reload("http api from " + r.RemoteAddr); err != nil {
		writeError(w, http.StatusUnprocessableEntity, "reload failed; keeping the previous configuration: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"reloaded": true})
}

// authorized wraps a mutating endpoint: it needs "Authorization: Bearer
// <token>". The token is compared in constant time and never logged.
func (h *HTTP) authorized(next http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if h.opts.Token == "" {
			writeError(w, http.StatusForbidden, "no admin token configured ([admin] token or ROLEGATE_ADMIN_TOKEN)")
			return
		}
		scheme, given, found := strings.Cut(r.Header.Get("Authorization"), " ")
		sum := sha256.Sum256([]byte(strings.TrimSpace(given)))
		if !found || !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(sum[:], h.token[:]) != 1 {
			h.logRefused(r)
			w.Header().Set("WWW-Authenticate", `Bearer realm="rolegate"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong bearer token")
			return
		}
		next(w, r)
	}
}

// logRefused logs a request refused for its token, rate-limited; the
// Authorization header is never logged.
func (h *HTTP) logRefused(r *http.Request) {
	skipped, ok := h.refusedToken.allow(time.Now())
	if !ok {
		return
	}
	h.log.Warn("admin request refused: missing or wrong bearer token",
		"method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "skipped_since_last", skipped)
}

func text(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	fmt.Fprintln(w, msg)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // a client that went away is not our error
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, map[string]string{"error": msg})
}
