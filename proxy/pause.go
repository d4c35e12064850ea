package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/pgname"
	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// The operator's holds on logins, PgBouncer's PAUSE / RESUME and DISABLE /
// ENABLE: a paused role or database makes its new logins wait until it is
// resumed; a disabled one refuses them. Sessions already logged in are never
// touched. They are runtime state of the Server, so a reload keeps them (as
// PgBouncer keeps a PAUSE across RELOAD); a restart forgets them.

// ReasonDisabled is the LoginFailed class of a login refused because an
// operator disabled its role or database.
const ReasonDisabled = "disabled by an operator"

// Gate is an operator's hold on the logins of one role or database.
type Gate struct {
	Scope      limiter.Scope // ScopeRole or ScopeDatabase
	Name       string
	Paused     bool
	PausedBy   string // who paused it ("console user admin", "http api from ...")
	Disabled   bool
	DisabledBy string
}

type gateKey struct {
	scope limiter.Scope
	name  string
}

// gates holds the Server's Gates. The check a login makes is one atomic load
// while nothing is paused or disabled.
type gates struct {
	any     atomic.Bool // m is not empty
	mu      sync.Mutex
	m       map[gateKey]Gate
	changed chan struct{} // closed and replaced on every change, for paused logins
}

// set changes the hold on key with f and reports whether it changed.
func (g *gates) set(key gateKey, f func(*Gate) bool) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	cur, ok := g.m[key]
	if !ok {
		cur = Gate{Scope: key.scope, Name: key.name}
	}
	if !f(&cur) {
		return false
	}
	if g.m == nil {
		g.m = map[gateKey]Gate{}
	}
	if cur.Paused || cur.Disabled {
		g.m[key] = cur
	} else {
		delete(g.m, key)
	}
	g.any.Store(len(g.m) > 0)
	if g.changed != nil {
		close(g.changed)
		g.changed = nil
	}
	return true
}

// check is the holds on a login of role into database: the hold that
// disables it and the one that pauses it (zero Gates for none; a role's hold
// before its database's), and a channel closed at the next change.
func (g *gates) check(role, database string) (disabled, paused Gate, changed <-chan struct{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, k := range []gateKey{{limiter.ScopeRole, role}, {limiter.ScopeDatabase, database}} {
		h, ok := g.m[k]
		if !ok {
			continue
		}
		if h.Disabled && !disabled.Disabled {
			disabled = h
		}
		if h.Paused && !paused.Paused {
			paused = h
		}
	}
	if g.changed == nil {
		g.changed = make(chan struct{})
	}
	return disabled, paused, g.changed
}

// list is every hold, roles first, each sorted by name.
func (g *gates) list() []Gate {
	g.mu.Lock()
	out := make([]Gate, 0, len(g.m))
	for _, h := range g.m {
		out = append(out, h)
	}
	g.mu.Unlock()
	slices.SortFunc(out, func(a, b Gate) int {
		if a.Scope != b.Scope {
			return int(a.Scope) - int(b.Scope)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out
}

func scopeWord(scope limiter.Scope) string {
	if scope == limiter.ScopeDatabase {
		return "database"
	}
	return "role"
}

// Pause makes new logins of a role (scope ScopeRole) or into a database
// (ScopeDatabase) wait until Resume; sessions already in are untouched. The
// name need not exist yet. It reports false when it was paused already.
func (s *Server) Pause(scope limiter.Scope, name, by string) bool {
	return s.setGate(scope, name, by, true, pausedOf, "paused new logins")
}

// Resume lets the logins Pause holds go on. It reports false when name was
// not paused.
func (s *Server) Resume(scope limiter.Scope, name, by string) bool {
	return s.setGate(scope, name, by, false, pausedOf, "resumed logins")
}

// Disable refuses new logins of a role or into a database (FATAL 55000
// after authentication), paused ones included, until Enable; sessions
// already in are untouched. It reports false when it was disabled already.
func (s *Server) Disable(scope limiter.Scope, name, by string) bool {
	return s.setGate(scope, name, by, true, disabledOf, "disabled new logins")
}

// Enable allows the logins Disable refused again. It reports false when
// name was not disabled.
func (s *Server) Enable(scope limiter.Scope, name, by string) bool {
	return s.setGate(scope, name, by, false, disabledOf, "enabled logins")
}

func pausedOf(g *Gate) (*bool, *string)   { return &g.Paused, &g.PausedBy }
func disabledOf(g *Gate) (*bool, *string) { return &g.Disabled, &g.DisabledBy }

// setGate turns one switch of a gate (field picks it and who set it) on or
// off, logs it with msg, and reports whether it changed.
func (s *Server) setGate(scope limiter.Scope, name, by string, on bool, field func(*Gate) (*bool, *string), msg string) bool {
	name = pgname.Identifier(name) // a long name names what the server stored, as logins' names are cut
	ok := s.gates.set(gateKey{scope, name}, func(g *Gate) bool {
		flag, who := field(g)
		if *flag == on {
			return false
		}
		*flag, *who = on, ""
		if on {
			*who = by
		}
		return true
	})
	s.log.Info(msg, "scope", scopeWord(scope), "name", name, "by", by, "changed", ok)
	return ok
}

// Gates lists the roles and databases paused or disabled now.
func (s *Server) Gates() []Gate { return s.gates.list() }

// gate holds an authenticated login while an operator has paused its role or
// database, and refuses it while either is disabled. A paused login holds no
// admission lock and no slot: it waits in state waiting until the hold ends,
// its client hangs up, or the session ends (shutdown).
func (c *clientConn) gate() error {
	if !c.s.gates.any.Load() {
		return nil
	}
	sess := c.sess
	var pausedBy string // the last hold it waited for
	for {
		disabled, paused, changed := c.s.gates.check(sess.user, sess.database)
		if disabled.Disabled {
			return c.disabled(disabled)
		}
		if !paused.Paused {
			if pausedBy != "" {
				c.log.Info("login resumed by an operator")
			}
			return nil
		}
		what := fmt.Sprintf("paused by an operator: PAUSE %s %q (%s)", strings.ToUpper(scopeWord(paused.Scope)), paused.Name, paused.PausedBy)
		if what != pausedBy {
			c.log.Info("login paused by an operator", "scope", scopeWord(paused.Scope), "name", paused.Name, "by", paused.PausedBy)
			sess.setWaiting(waitingFor{what: what})
			pausedBy = what
		}
		left := watchHangUp(c.client, c.cr)
		var err error
		select {
		case <-changed:
		case <-left.gone:
			err = errClientClosed
		case <-c.ctx.Done():
			err = context.Cause(c.ctx)
		}
		left.stop()
		if err != nil {
			return err
		}
	}
}

// disabled is the refusal of a login whose role or database h disables,
// after AuthenticationOk as the server's own refusals after authentication
// (passthrough: the server's messages up to it).
func (c *clientConn) disabled(h Gate) error {
	msg := fmt.Sprintf(`logins of role "%s" are disabled by an operator of rolegate`, h.Name)
	hint := fmt.Sprintf(`An operator allows them again with ENABLE ROLE %s on the rolegate console.`, quoteIdent(h.Name))
	if h.Scope == limiter.ScopeDatabase {
		msg = fmt.Sprintf(`logins to database "%s" are disabled by an operator of rolegate`, h.Name)
		hint = fmt.Sprintf(`An operator allows them again with ENABLE DATABASE %s on the rolegate console.`, quoteIdent(h.Name))
	}
	before := c.authOut
	if before == nil {
		before = wire.Encode(nil, &pgproto3.AuthenticationOk{})
	}
	return &clientError{code: "55000", msg: msg, hint: hint, before: before, class: ReasonDisabled, roleExists: true}
}

// quoteIdent quotes name for the console when it needs it.
func quoteIdent(name string) string {
	if name != "" && !strings.ContainsAny(name, " \t\r\n\f\v;\"") {
		return name
	}
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

// KillRole terminates every server backend of role for an operator: the
// sessions rolegate relays, those another instance relays and those opened
// directly against the server, as the census of the role lists them
// (rolegate's own control connections excepted). Each relayed client is
// told why, with 57P01. It returns the pids it terminated; an error for a
// backend does not stop the others, and they are joined.
func (s *Server) KillRole(ctx context.Context, role, by string) ([]uint32, error) {
	lim := s.cfg.Limits
	if lim == nil {
		return nil, ErrNoControl
	}
	role = pgname.Identifier(role)
	cctx, cancel := context.WithTimeout(ctx, controlTimeout)
	holders, err := lim.Server.Census(cctx, role, "")
	cancel()
	if err != nil {
		s.log.Warn("kill role failed", "role", role, "by", by, "err", err)
		return nil, fmt.Errorf("list the sessions of role %q: %w", role, err)
	}
	why := fmt.Sprintf("terminating connection: rolegate terminated this session at an operator's request (KILL ROLE %s, %s)",
		quoteIdent(role), by)
	killed := []uint32{}
	type gone struct {
		target upstream.Target
		closed <-chan struct{}
	}
	var signalled []gone
	var errs []error
	for _, h := range holders {
		if h.PID == 0 || h.Role != role || h.Protected {
			continue // a reservation, another role's row, or rolegate's own control connection
		}
		held := s.registry.byBackendPID(h.PID)
		r, err := s.terminate(ctx, upstream.Target{PID: h.PID, BackendStart: h.BackendStart}, held, why)
		if err != nil {
			errs = append(errs, fmt.Errorf("terminate backend %d: %w", h.PID, err))
			continue
		}
		if r != upstream.Terminated {
			continue // it had ended already
		}
		killed = append(killed, h.PID)
		var closed <-chan struct{}
		if held != nil {
			closed = held.serverGone
		}
		signalled = append(signalled, gone{upstream.Target{PID: h.PID, BackendStart: h.BackendStart}, closed})
		ev := Event{Time: time.Now(), Kind: "kill", VictimPID: h.PID, ViaRolegate: held != nil, VictimRole: role,
			VictimClient: clientOf(held), Reason: "operator: KILL ROLE " + quoteIdent(role) + ", " + by}
		if held != nil {
			ev.VictimApplicationName = held.appName
		} else if h.Client.IsValid() {
			ev.VictimClient = h.Client.String()
		}
		s.record(ev)
	}
	// The answer comes once the sessions are gone, so that what an operator
	// sees next (SHOW SESSIONS, another KILL ROLE) no longer lists them: a
	// signalled backend stays in pg_stat_activity a moment. Every session
	// was signalled first, so the waits overlap.
	for _, g := range signalled {
		if r, err := s.awaitGone(ctx, g.target, g.closed); err != nil || r != upstream.Terminated {
			s.log.Warn("kill role: a terminated session did not exit in time", "role", role, "pid", g.target.PID, "err", err)
		}
	}
	err = errors.Join(errs...)
	level, attrs := slog.LevelInfo, []any{"role", role, "by", by, "killed", len(killed), "pids", killed}
	if err != nil {
		level, attrs = slog.LevelWarn, append(attrs, "err", err)
	}
	s.log.Log(ctx, level, "killed the sessions of a role", attrs...)
	return killed, err
}
