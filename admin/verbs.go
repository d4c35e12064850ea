package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// The verbs PgBouncer users reach for: SHOW HELP, PAUSE / RESUME and
// DISABLE / ENABLE of a role or database, KILL ROLE and SHUTDOWN [WAIT],
// on the console and over HTTP.

// Gatekeeper is what PAUSE, RESUME, DISABLE, ENABLE and KILL ROLE need from
// the proxy (proxy.Server implements it). Without it (a Proxy that does not
// implement it) those verbs answer 55000 on the console and 501 over HTTP.
type Gatekeeper interface {
	Pause(scope limiter.Scope, name, by string) bool
	Resume(scope limiter.Scope, name, by string) bool
	Disable(scope limiter.Scope, name, by string) bool
	Enable(scope limiter.Scope, name, by string) bool
	Gates() []proxy.Gate
	KillRole(ctx context.Context, role, by string) ([]uint32, error)
}

func (o *Options) gatekeeper() Gatekeeper {
	g, _ := o.Proxy.(Gatekeeper)
	return g
}

// holds is the state of every paused or disabled name of scope.
func (o *Options) holds(scope limiter.Scope) map[string]proxy.Gate {
	g := o.gatekeeper()
	if g == nil {
		return nil
	}
	out := map[string]proxy.Gate{}
	for _, h := range g.Gates() {
		if h.Scope == scope {
			out[h.Name] = h
		}
	}
	return out
}

// gateVerb is one of PAUSE, RESUME, DISABLE and ENABLE: what it does and
// what the console says when it changes nothing.
type gateVerb struct {
	do        func(g Gatekeeper, scope limiter.Scope, name, by string) bool
	unchanged string // "%s %q is already paused"
}

var gateVerbs = map[string]gateVerb{
	"PAUSE":   {Gatekeeper.Pause, "%s %q is already paused"},
	"RESUME":  {Gatekeeper.Resume, "%s %q is not paused"},
	"DISABLE": {Gatekeeper.Disable, "%s %q is already disabled"},
	"ENABLE":  {Gatekeeper.Enable, "%s %q is not disabled"},
}

// helpRows are SHOW HELP's rows: every command of the console.
var helpRows = [][2]string{
	{"SHOW HELP", "this list"},
	{"SHOW SESSIONS", "sessions through rolegate and elsewhere, and logins in flight"},
	{"SHOW ROLES", "per role: limit, policy, sessions, counters, overrides, dry-run decisions, thrashing, paused, disabled"},
	{"SHOW DATABASES", "per database: limit, policy, sessions, paused, disabled"},
	{"SHOW EVICTIONS", "recent evictions, rejections and kills"},
	{"SHOW INSTANCES", "the rolegate instances in front of the same server"},
	{"SHOW CONFIG", "the configuration in force, secrets redacted"},
	{"SHOW STATS", "totals since start"},
	{"SHOW VERSION", "rolegate's version"},
	{"KILL <pid>", "terminate one server backend; a relayed client is told why"},
	{"KILL ROLE <role>", "terminate every session of a role, through rolegate or not"},
	{"PAUSE ROLE <role> | DATABASE <db>", "new logins wait until RESUME; sessions are untouched"},
	{"RESUME ROLE <role> | DATABASE <db>", "let paused logins go on"},
	{"DISABLE ROLE <role> | DATABASE <db>", "refuse new logins (FATAL 55000) until ENABLE; sessions are untouched"},
	{"ENABLE ROLE <role> | DATABASE <db>", "allow logins again"},
	{"SET LIMIT <role> <n>", "override a role's limit until the next reload"},
	{"SET POLICY <role> <policy> [DRY RUN]", "override a role's policy until the next reload; DRY RUN decides and logs without acting"},
	{"EXPLAIN LOGIN <role> [<database> [<application_name> [<client>]]]", "what a login would get now and why; changes nothing"},
	{"RELOAD", "re-read proxy.toml (as SIGHUP); pauses and disables stay"},
	{"SHUTDOWN", "close every session now and exit (as SIGINT)"},
	{"SHUTDOWN WAIT", "stop accepting, let sessions finish up to shutdown_timeout, exit (as SIGTERM)"},
}

// verb runs the commands of this file; ok is false for any other command.
func (s *consoleSession) verb(ctx context.Context, w []string) (err *consoleError, ok bool) {
	kw := func(i int, want string) bool { return i < len(w) && strings.EqualFold(w[i], want) }
	switch {
	case kw(0, "SHOW") && kw(1, "HELP") && len(w) == 2:
		rows := make([][][]byte, 0, len(helpRows))
		for _, r := range helpRows {
			rows = append(rows, [][]byte{txt(r[0]), txt(r[1])})
		}
		s.table("SHOW", []column{{"command", oidText}, {"description", oidText}}, rows)
		return nil, true
	case kw(0, "KILL") && kw(1, "ROLE"):
		if len(w) != 3 {
			return syntaxError(), true
		}
		return s.killRole(ctx, w[2]), true
	case kw(0, "SHUTDOWN") && (len(w) == 1 || len(w) == 2 && kw(1, "WAIT")):
		return s.shutdown(len(w) == 2), true
	case len(w) >= 1:
		v, found := gateVerbs[strings.ToUpper(w[0])]
		if !found {
			return nil, false
		}
		if len(w) != 3 || !kw(1, "ROLE") && !kw(1, "DATABASE") {
			return syntaxError(), true
		}
		return s.gate(strings.ToUpper(w[0]), v, w[1], w[2]), true
	}
	return nil, false
}

func (s *consoleSession) gate(verb string, v gateVerb, kind, name string) *consoleError {
	g := s.c.opts.gatekeeper()
	if g == nil {
		return errorf("55000", "%s is not available on this console", verb)
	}
	scope, word := limiter.ScopeRole, "role"
	if strings.EqualFold(kind, "DATABASE") {
		scope, word = limiter.ScopeDatabase, "database"
	}
	// The proxy writes the log line, with who asked.
	if !v.do(g, scope, name, s.by) {
		s.notice(fmt.Sprintf(v.unchanged, word, name))
	}
	s.send(&pgproto3.CommandComplete{CommandTag: []byte(verb)})
	return nil
}

func (s *consoleSession) killRole(ctx context.Context, role string) *consoleError {
	g := s.c.opts.gatekeeper()
	if g == nil {
		return errorf("55000", "KILL ROLE is not available on this console")
	}
	// The proxy writes the log line: the role, who asked, the pids.
	pids, err := g.KillRole(ctx, role, s.by)
	switch {
	case errors.Is(err, proxy.ErrNoControl):
		return errorf("55000", "%s", err.Error())
	case err != nil && len(pids) == 0:
		return errorf("58000", "%s", err.Error())
	case err != nil:
		s.send(&pgproto3.NoticeResponse{Severity: "WARNING", SeverityUnlocalized: "WARNING", Code: "01000",
			Message: "some sessions could not be terminated: " + err.Error()})
	}
	rows := make([][][]byte, 0, len(pids))
	for _, pid := range pids {
		rows = append(rows, [][]byte{num(pid), boolean(true)})
	}
	s.table("KILL", []column{{"pid", oidInt4}, {"terminated", oidText}}, rows)
	return nil
}

// shutdown answers SHUTDOWN and asks for it only once the answer is out
// (after): the console's own session closes with the others.
func (s *consoleSession) shutdown(wait bool) *consoleError {
	if s.c.opts.Shutdown == nil {
		return errorf("55000", "shutdown is not available on this console")
	}
	if wait {
		s.notice("rolegate stops accepting; open sessions may finish within shutdown_timeout")
	}
	s.send(&pgproto3.CommandComplete{CommandTag: []byte("SHUTDOWN")})
	by := s.by
	s.after = func() { s.c.opts.Shutdown(wait, by) }
	return nil
}

// registerVerbs adds the HTTP endpoints of the verbs, all behind the token.
func (h *HTTP) registerVerbs(mux *http.ServeMux) {
	for _, verb := range []string{"pause", "resume", "disable", "enable"} {
		v := gateVerbs[strings.ToUpper(verb)]
		mux.HandleFunc("POST /api/roles/{name}/"+verb, h.authorized(h.gateHandler(limiter.ScopeRole, verb, v)))
		mux.HandleFunc("POST /api/databases/{name}/"+verb, h.authorized(h.gateHandler(limiter.ScopeDatabase, verb, v)))
	}
	mux.HandleFunc("POST /api/roles/{name}/kill", h.authorized(h.killRole))
	mux.HandleFunc("POST /api/shutdown", h.authorized(h.shutdown))
}

func (h *HTTP) gateHandler(scope limiter.Scope, verb string, v gateVerb) http.HandlerFunc {
	word := "role"
	if scope == limiter.ScopeDatabase {
		word = "database"
	}
	return func(w http.ResponseWriter, r *http.Request) {
		g := h.opts.gatekeeper()
		if g == nil {
			writeError(w, http.StatusNotImplemented, verb+" is not available")
			return
		}
		name := r.PathValue("name")
		changed := v.do(g, scope, name, "http api from "+r.RemoteAddr)
		held := h.opts.holds(scope)[name]
		writeJSON(w, http.StatusOK, map[string]any{word: name, "action": verb, "changed": changed,
			"paused": held.Paused, "disabled": held.Disabled})
	}
}

func (h *HTTP) killRole(w http.ResponseWriter, r *http.Request) {
	g := h.opts.gatekeeper()
	if g == nil {
		writeError(w, http.StatusNotImplemented, "kill role is not available")
		return
	}
	role := r.PathValue("name")
	pids, err := g.KillRole(r.Context(), role, "http api from "+r.RemoteAddr)
	switch {
	case errors.Is(err, proxy.ErrNoControl):
		writeError(w, http.StatusServiceUnavailable, err.Error())
	case err != nil && len(pids) == 0:
		writeError(w, http.StatusBadGateway, err.Error())
	case err != nil:
		writeJSON(w, http.StatusOK, map[string]any{"role": role, "terminated": pids, "error": err.Error()})
	default:
		writeJSON(w, http.StatusOK, map[string]any{"role": role, "terminated": pids})
	}
}

func (h *HTTP) shutdown(w http.ResponseWriter, r *http.Request) {
	if h.opts.Shutdown == nil {
		writeError(w, http.StatusNotImplemented, "shutdown is not available")
		return
	}
	wait := false
	switch q := r.URL.Query().Get("wait"); q {
	case "", "0", "false":
	case "1", "true":
		wait = true
	default:
		writeError(w, http.StatusBadRequest, fmt.Sprintf("invalid wait %q: want 1 or 0", q))
		return
	}
	// The answer is written before the shutdown starts; the HTTP server's
	// own shutdown lets it reach the client.
	writeJSON(w, http.StatusAccepted, map[string]any{"shutdown": true, "wait": wait})
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	h.opts.Shutdown(wait, "http api from "+r.RemoteAddr)
}
