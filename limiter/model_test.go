package limiter

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// The model test plays the proxy and the server: random logins, session
// ends, state changes, clock steps, waits and evictions (some failing, some
// carried out only after another login was decided, some victims leaving
// pg_stat_activity before they are reported), sessions that can never be
// evicted (the control role may not signal them, or they do not exit in
// time: they linger, and some end later on their own), and checks after
// every decision that
//
//   - victims are valid: in the census, of the login's role or database,
//     never superuser, protected, replication, already in flight, too young,
//     or (evict-idle) busy;
//   - the slots held (sessions plus victims not yet reported) never exceed a
//     limit once the caller carried out the decision;
//   - a login is never handed a victim it reported with EvictFailed, and
//     gets its decision in a bounded number of rounds however many
//     evictions fail;
//   - admitted logins are reserved and land as sessions a few steps later
//     (or fail, also when a direct session took their slot on the server);
//     at an admission the slots held, logins in flight included, never
//     exceed the login's limits;
//   - under newest-wins with min_session_age 0 and fallback reject, a login
//     is never rejected for its role while an evictable session exists
//     (one it has not failed to evict), or logins in flight that would be;
//   - with only a role limit, an eviction asks for exactly the slots needed;
//   - the limiter's tickets and victims in flight match the caller's.

// chooser is where the model's choices come from: math/rand for the model
// test, the fuzzer's bytes for FuzzDecide.
type chooser interface {
	intn(n int) int
	done() bool
}

type randChooser struct {
	r     *rand.Rand
	steps int
}

func (c *randChooser) intn(n int) int { return c.r.IntN(n) }
func (c *randChooser) done() bool     { c.steps--; return c.steps < 0 }

type byteChooser struct{ b []byte }

func (c *byteChooser) intn(n int) int {
	if len(c.b) == 0 {
		return 0
	}
	v := int(c.b[0]) % n
	c.b = c.b[1:]
	return v
}
func (c *byteChooser) done() bool { return len(c.b) == 0 }

type sim struct {
	tb       testing.TB
	ch       chooser
	clk      *fakeClock
	l        *Limiter
	roles    map[string]Rule
	dbs      map[string]Rule
	supers   map[string]bool // roles that are superusers
	sessions map[uint32]Holder
	ghosts   map[uint32]Holder               // victims gone from the census, not reported yet
	inflight map[uint32]bool                 // victims handed out, not reported yet
	stuck    map[uint32]bool                 // sessions whose eviction always fails
	failed   map[uint64]map[uint32]time.Time // per login: victims it failed to evict, by backend_start
	waiting  []Login
	flights  []flight // admitted logins still logging in (reserved)
	step     int
	pid      uint32
	id       uint64
	log      []string
}

// flight is an admitted login still logging in to the server: its slot is
// reserved (Reserve) until it lands as a session at step landAt, or fails.
// Which flights fail and when they land follow from the login's ID, so that
// the fuzzer's bytes mean what they meant before flights were modelled.
type flight struct {
	lg     Login
	r      *Reservation
	landAt int
	pid    uint32 // its backend, when the server shows it already (Identify)
}

var (
	simRoles = []string{"a", "b", "c", "postgres"}
	simDBs   = []string{"d1", "d2"}
	simState = []string{"idle", "idle", "active", "idle in transaction", "idle in transaction (aborted)", ""}
)

func newSim(tb testing.TB, ch chooser) *sim {
	clk := newClock()
	s := &sim{
		tb: tb, ch: ch, clk: clk, l: New(clk.Now),
		roles: map[string]Rule{}, dbs: map[string]Rule{}, supers: map[string]bool{"postgres": true},
		sessions: map[uint32]Holder{}, ghosts: map[uint32]Holder{}, inflight: map[uint32]bool{},
		stuck: map[uint32]bool{}, failed: map[uint64]map[uint32]time.Time{},
	}
	for _, r := range simRoles {
		s.roles[r] = s.rule()
	}
	for _, d := range simDBs {
		if s.ch.intn(2) == 0 {
			s.dbs[d] = NoLimit()
		} else {
			s.dbs[d] = s.rule()
		}
	}
	s.logf("roles %v dbs %v", s.roles, s.dbs)
	return s
}

func (s *sim) pick(n int) int { return s.ch.intn(n) }

func (s *sim) rule() Rule {
	policies := []Policy{PolicyReject, PolicyWait, PolicyNewestWins, PolicyNewestWins, PolicyEvictIdle}
	return Rule{
		MaxSessions:   Effective(s.pick(5)-1, s.pick(5)-1),
		Policy:        policies[s.pick(len(policies))],
		Fallback:      []Policy{PolicyReject, PolicyWait, ""}[s.pick(3)],
		MinSessionAge: []time.Duration{0, 0, 30 * time.Second, 2 * time.Minute}[s.pick(4)],
		WaitTimeout:   []time.Duration{0, 10 * time.Second, time.Minute}[s.pick(3)],
		Budget:        []Budget{{}, {}, {Evictions: 2, Per: time.Minute}, {Evictions: 0, Per: time.Second}}[s.pick(4)],
	}
}

func (s *sim) logf(format string, args ...any) {
	s.log = append(s.log, fmt.Sprintf("%s ", s.clk.Now().Sub(t0))+fmt.Sprintf(format, args...))
}

func (s *sim) fail(format string, args ...any) {
	s.tb.Helper()
	for _, line := range s.log[max(0, len(s.log)-40):] {
		s.tb.Log(line)
	}
	s.tb.Fatalf(format, args...)
}

func (s *sim) run() {
	for !s.ch.done() {
		s.step++
		s.land(false)
		switch s.pick(10) {
		case 0, 1, 2:
			s.login(s.newLogin(), true)
		case 3:
			s.endSession()
		case 4:
			s.clk.Advance(time.Duration(s.pick(4)) * 20 * time.Second)
		case 5:
			if p, ok := s.anySession(); ok {
				h := s.sessions[p]
				h.State = simState[s.pick(len(simState))]
				h.StateChange = s.clk.Now()
				s.sessions[p] = h
			}
		case 6, 7:
			if len(s.waiting) > 0 {
				i := s.pick(len(s.waiting))
				w := s.waiting[i]
				s.waiting = slices.Delete(s.waiting, i, i+1)
				s.login(w, true)
			}
		case 8:
			if len(s.waiting) > 0 {
				i := s.pick(len(s.waiting))
				s.logf("login %d leaves", s.waiting[i].ID)
				s.waiting[i].Ticket.Leave()
				s.waiting = slices.Delete(s.waiting, i, i+1)
			}
		case 9:
			s.direct()
		}
		s.checkState()
	}
	s.land(true)
	for _, w := range s.waiting {
		w.Ticket.Leave()
	}
	if n := len(s.l.tickets); n != 0 {
		s.fail("%d tickets left after every login left", n)
	}
}

// land ends the flights due (all of them): most become sessions, as the
// proxy's logins do at ReadyForQuery; some fail (the server refused, the
// client left), and so does one whose slot the server sees taken by a
// session opened directly meanwhile (the server's own 53300).
func (s *sim) land(all bool) {
	s.flights = slices.DeleteFunc(s.flights, func(f flight) bool {
		if !all && f.landAt > s.step {
			return false
		}
		lg := f.lg
		if f.pid != 0 {
			// Its backend is a session already: it ends with the login if
			// that fails, and may have ended on its own.
			_, alive := s.sessions[f.pid]
			if lg.ID%7 == 0 || !alive {
				delete(s.sessions, f.pid)
				s.logf("login %d (pid %d) fails to log in", lg.ID, f.pid)
				f.r.Release(false)
				return true
			}
			s.logf("login %d (pid %d) lands", lg.ID, f.pid)
			f.r.Release(true)
			return true
		}
		full := s.serverFull(ScopeRole, lg.Role, s.roles[lg.Role]) || s.serverFull(ScopeDatabase, lg.Database, s.dbs[lg.Database])
		if lg.ID%7 == 0 || full {
			s.logf("login %d fails to log in (server full: %v)", lg.ID, full)
			f.r.Release(false)
			return true
		}
		s.addSession(lg)
		s.logf("login %d lands as pid %d", lg.ID, s.pid)
		f.r.Release(true)
		return true
	})
}

// serverFull reports whether the server would refuse one more session of the
// limit: it counts sessions, not rolegate's reservations.
func (s *sim) serverFull(scope Scope, name string, r Rule) bool {
	return r.Limited() && s.held(scope, name, false)+1 > r.MaxSessions
}

// addSession adds lg's backend to the server.
func (s *sim) addSession(lg Login) {
	s.pid++
	s.sessions[s.pid] = Holder{PID: s.pid, Role: lg.Role, Database: lg.Database, BackendStart: s.clk.Now(),
		State: "idle", StateChange: s.clk.Now(), Superuser: lg.Superuser, Replication: lg.Replication, ViaRolegate: true}
	s.stuck[s.pid] = s.pick(6) == 0
}

func (s *sim) newLogin() Login {
	s.id++
	r := simRoles[s.pick(len(simRoles))]
	return Login{ID: s.id, Role: r, Database: simDBs[s.pick(len(simDBs))], Superuser: s.supers[r], Replication: s.pick(20) == 0}
}

func (s *sim) anySession() (uint32, bool) {
	if len(s.sessions) == 0 {
		return 0, false
	}
	keys := slices.Sorted(maps.Keys(s.sessions))
	return keys[s.pick(len(keys))], true
}

func (s *sim) census() []Holder {
	out := make([]Holder, 0, len(s.sessions))
	for _, p := range slices.Sorted(maps.Keys(s.sessions)) {
		out = append(out, s.sessions[p])
	}
	return out
}

// endSession ends a session on its own (client quit, or it was opened
// elsewhere); rolegate is told only sometimes.
func (s *sim) endSession() {
	p, ok := s.anySession()
	if !ok {
		return
	}
	h := s.sessions[p]
	delete(s.sessions, p)
	if s.inflight[p] {
		s.ghosts[p] = h // its report comes with the eviction
	}
	s.logf("pid %d ends", p)
	if h.ViaRolegate {
		s.l.Released(h.Role, h.Database)
	}
}

// direct opens a session straight against the server, which applies the
// same limits but neither waits nor evicts (and counts superusers' sessions
// against the database, as the limiter does).
func (s *sim) direct() {
	s.pid++
	r := simRoles[s.pick(len(simRoles))]
	h := Holder{PID: s.pid, Role: r, Database: simDBs[s.pick(len(simDBs))], BackendStart: s.clk.Now(),
		State: "idle", StateChange: s.clk.Now(), Superuser: s.supers[r], Protected: s.pick(3) == 0, Replication: s.pick(10) == 0}
	if !h.Superuser && !h.Replication {
		if s.serverFull(ScopeRole, h.Role, s.roles[r]) || s.serverFull(ScopeDatabase, h.Database, s.dbs[h.Database]) {
			return
		}
	}
	s.logf("direct session %+v", h)
	s.sessions[h.PID] = h
	s.stuck[h.PID] = s.pick(4) == 0
}

// held counts the slots of a limit taken: sessions and ghosts, superusers
// included for databases, as in the limiter, and with flights the logins
// still logging in (which the server does not see yet).
func (s *sim) held(scope Scope, name string, flights bool) int {
	n := 0
	for _, f := range s.flights {
		switch {
		case !flights || f.pid != 0: // a backend already: counted below
		case scope == ScopeRole && f.lg.Role == name:
			n++
		case scope == ScopeDatabase && f.lg.Database == name:
			n++
		}
	}
	for _, m := range []map[uint32]Holder{s.sessions, s.ghosts} {
		for _, h := range m {
			switch {
			case h.Replication:
			case scope == ScopeRole && h.Role == name && !h.Superuser:
				n++
			case scope == ScopeDatabase && h.Database == name:
				n++
			}
		}
	}
	return n
}

// login runs one login through Decide until it is admitted, rejected or
// waits. nest allows one other login to be decided while its victims are
// still in flight.
func (s *sim) login(lg Login, nest bool) {
	for range 50 {
		lg.CensusEpoch = s.l.Epoch()
		census := s.census()
		d := s.l.Decide(lg, s.roles[lg.Role], s.dbs[lg.Database], census)
		s.logf("login %d %s/%s: %v %v (%s)", lg.ID, lg.Role, lg.Database, d.Kind, pids(d.Victims), d.Reason)
		s.checkDecision(lg, d, census)
		lg.Ticket = d.Ticket
		switch d.Kind {
		case Admit:
			if lg.Superuser || lg.Replication {
				s.addSession(lg) // exempt: nothing to reserve
			} else {
				// Reserved, as the proxy does, and logging in for a step or
				// three; the check counts it from now on. Some show their
				// backend in the census before they land.
				f := flight{lg: lg, r: s.l.Reserve(lg), landAt: s.step + 1 + int(lg.ID%3)}
				full := s.serverFull(ScopeRole, lg.Role, s.roles[lg.Role]) || s.serverFull(ScopeDatabase, lg.Database, s.dbs[lg.Database])
				if lg.ID%2 == 0 && !full {
					s.addSession(lg)
					f.pid = s.pid
					f.r.Identify(netip.AddrPort{}, f.pid)
				}
				s.flights = append(s.flights, f)
			}
			s.checkLimits(true, lg)
			return
		case Reject:
			return
		case Wait:
			s.waiting = append(s.waiting, lg)
			return
		}
		for _, v := range d.Victims {
			s.inflight[v.PID] = true
		}
		// Victims may drop out of pg_stat_activity before they are reported.
		for _, v := range d.Victims {
			if s.pick(3) == 0 {
				if h, ok := s.sessions[v.PID]; ok {
					delete(s.sessions, v.PID)
					s.ghosts[v.PID] = h
				}
			}
		}
		if s.pick(8) == 0 {
			// Deciding again before reporting: the login waits for its own
			// victims (or is rejected when it may not wait).
			again := s.l.Decide(lg, s.roles[lg.Role], s.dbs[lg.Database], s.census())
			s.logf("login %d again before reporting: %v (%s)", lg.ID, again.Kind, again.Reason)
			if again.Kind != Wait && again.Kind != Reject {
				s.fail("deciding again before reporting: %v", again.Kind)
			}
			if again.Kind == Reject {
				s.report(lg, d.Victims)
				return
			}
		}
		if nest && s.pick(3) == 0 {
			s.login(s.newLogin(), false) // decided while these victims are in flight
		}
		s.report(lg, d.Victims)
	}
	s.fail("login %d still evicting after 50 rounds", lg.ID)
}

// report carries out the evictions of lg: most succeed, some fail, and a
// stuck session's always fails (it stays, lingering, until it ends on its
// own).
func (s *sim) report(lg Login, victims []Holder) {
	for _, v := range victims {
		delete(s.inflight, v.PID)
		_, present := s.sessions[v.PID]
		if present && (s.stuck[v.PID] || s.pick(6) == 0) {
			s.logf("evicting pid %d fails", v.PID)
			s.l.EvictFailed(v.PID)
			if s.failed[lg.ID] == nil {
				s.failed[lg.ID] = map[uint32]time.Time{}
			}
			s.failed[lg.ID][v.PID] = v.BackendStart
			continue
		}
		delete(s.sessions, v.PID)
		delete(s.ghosts, v.PID)
		s.l.Evicted(v.PID)
		if v.ViaRolegate {
			s.l.Released(v.Role, v.Database)
		}
	}
}

func (s *sim) checkDecision(lg Login, d Decision, census []Holder) {
	s.tb.Helper()
	now := s.clk.Now()
	rr, dr := s.roles[lg.Role], s.dbs[lg.Database]
	if d.Kind < Admit || d.Kind > Reject {
		s.fail("bad kind %v", d.Kind)
	}
	if (lg.Superuser || lg.Replication) && d.Kind != Admit {
		s.fail("exempt login %+v got %v", lg, d.Kind)
	}
	if d.Kind != Evict && len(d.Victims) > 0 {
		s.fail("%v with victims", d.Kind)
	}
	seen := map[uint32]bool{}
	for _, v := range d.Victims {
		present := slices.ContainsFunc(census, func(h Holder) bool { return h.PID == v.PID })
		switch {
		case seen[v.PID]:
			s.fail("pid %d twice in one decision", v.PID)
		case !present:
			s.fail("victim %d is not in the census", v.PID)
		case s.inflight[v.PID]:
			s.fail("victim %d is already being evicted", v.PID)
		case v.Superuser || v.Protected || v.Replication || v.PID == 0:
			s.fail("victim %+v is exempt", v)
		case s.failedFor(lg, v):
			s.fail("victim %d handed again to login %d, which could not evict it", v.PID, lg.ID)
		case slices.ContainsFunc(s.flights, func(f flight) bool { return f.pid == v.PID }):
			s.fail("victim %d is a login still logging in", v.PID)
		}
		seen[v.PID] = true
		ok := false
		for _, c := range []struct {
			in bool
			r  Rule
		}{{v.Role == lg.Role, rr}, {v.Database == lg.Database, dr}} {
			if c.in && c.r.Limited() && c.r.policy().Evicts() && now.Sub(v.BackendStart) >= c.r.MinSessionAge &&
				(c.r.policy() != PolicyEvictIdle || v.State == "idle") {
				ok = true
			}
		}
		if !ok {
			s.fail("victim %+v is not evictable for login %+v", v, lg)
		}
	}
	if d.Kind == Evict && len(d.VictimPolicies) != len(d.Victims) {
		s.fail("%d victims, %d victim policies", len(d.Victims), len(d.VictimPolicies))
	}
	for i, p := range d.VictimPolicies {
		if v := d.Victims[i]; !(v.Role == lg.Role && p == rr.policy() || v.Database == lg.Database && p == dr.policy()) || !p.Evicts() {
			s.fail("victim %d chosen by policy %s for login %+v", v.PID, p, lg)
		}
	}
	if need := d.Count + 1 - d.Limit; d.Kind == Evict && !dr.Limited() && len(d.Victims) != need-s.unseen(lg, rr, need) {
		s.fail("%d victims for count %d limit %d", len(d.Victims), d.Count, d.Limit)
	}
	if d.Kind == Reject && d.Scope == ScopeRole && rr.policy() == PolicyNewestWins && rr.MinSessionAge == 0 && rr.fallback() == PolicyReject &&
		!d.Thrashing { // a spent eviction budget hands over to the fallback
		flying := 0
		for _, f := range s.flights {
			if f.lg.Role == lg.Role {
				flying++
			}
		}
		evictable := 0
		for _, h := range census {
			logging := slices.ContainsFunc(s.flights, func(f flight) bool { return f.pid == h.PID })
			if h.Role == lg.Role && !h.Superuser && !h.Protected && !h.Replication && h.PID != 0 && !s.inflight[h.PID] && !s.failedFor(lg, h) && !logging {
				if flying == 0 {
					s.fail("rejected under newest-wins although pid %d could be evicted", h.PID)
				}
				evictable++
			}
		}
		// With logins in flight the role may hold more slots than its limit
		// (the server lets a direct session take a reserved slot); the
		// login must wait for them to land unless even they would not do.
		if need := s.held(ScopeRole, lg.Role, true) + 1 - rr.MaxSessions; flying > 0 && evictable+flying >= need {
			s.fail("rejected under newest-wins although %d logins in flight could be evicted once they land", flying)
		}
	}
}

// unseen counts the slots of lg's role held by logins in flight whose
// backends the census does not show as theirs, up to need: an evicting
// login waits for those to land instead of evicting for them.
func (s *sim) unseen(lg Login, r Rule, need int) int {
	if r.MinSessionAge > 0 {
		return 0
	}
	n := 0
	for _, f := range s.flights {
		if f.lg.Role == lg.Role && f.pid == 0 {
			n++
		}
	}
	return min(n, need)
}

// failedFor reports whether lg reported h's eviction as failed before.
func (s *sim) failedFor(lg Login, h Holder) bool {
	start, ok := s.failed[lg.ID][h.PID]
	return ok && start.Equal(h.BackendStart)
}

// checkLimits: the slots held never exceed a limit; at an admission the
// admitted login's database may not exceed its limit even counting
// superusers (whose own logins may later go beyond it, as in PostgreSQL).
func (s *sim) checkLimits(admitted bool, lg Login) {
	s.tb.Helper()
	for r, rl := range s.roles {
		if n := s.held(ScopeRole, r, false); rl.Limited() && n > rl.MaxSessions {
			s.fail("role %s holds %d slots, limit %d", r, n, rl.MaxSessions)
		}
	}
	for d, dl := range s.dbs {
		n := 0
		for _, m := range []map[uint32]Holder{s.sessions, s.ghosts} {
			for _, h := range m {
				if h.Database == d && !h.Replication && !h.Superuser {
					n++
				}
			}
		}
		if dl.Limited() && n > dl.MaxSessions {
			s.fail("database %s holds %d slots, limit %d", d, n, dl.MaxSessions)
		}
	}
	if admitted && !lg.Superuser && !lg.Replication {
		if dl := s.dbs[lg.Database]; dl.Limited() && s.held(ScopeDatabase, lg.Database, true) > dl.MaxSessions {
			s.fail("database %s over its limit %d at an admission", lg.Database, dl.MaxSessions)
		}
		if rl := s.roles[lg.Role]; rl.Limited() && s.held(ScopeRole, lg.Role, true) > rl.MaxSessions {
			s.fail("role %s over its limit %d at an admission, counting logins in flight", lg.Role, rl.MaxSessions)
		}
	}
}

func (s *sim) checkState() {
	s.tb.Helper()
	s.checkLimits(false, Login{})
	snap := s.l.Snapshot()
	if len(snap.Evicting) != 0 {
		s.fail("victims in flight between logins: %+v", snap.Evicting)
	}
	waiting := 0
	for _, n := range snap.WaitingByRole {
		waiting += n
	}
	if waiting != len(s.waiting) || len(s.l.tickets) != len(s.waiting) {
		s.fail("limiter has %d waiting and %d tickets, caller %d", waiting, len(s.l.tickets), len(s.waiting))
	}
}

func TestModel(t *testing.T) {
	seeds := 150
	if testing.Short() {
		seeds = 30
	}
	for seed := range uint64(seeds) {
		s := newSim(t, &randChooser{r: rand.New(rand.NewPCG(seed, 7)), steps: 200})
		s.logf("seed %d", seed)
		s.run()
	}
}

func FuzzDecide(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"))
	r := rand.New(rand.NewPCG(1, 2))
	for range 8 {
		b := make([]byte, 300)
		for i := range b {
			b[i] = byte(r.IntN(256))
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 4000 {
			data = data[:4000]
		}
		newSim(t, &byteChooser{b: data}).run()
	})
}
