package admin

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
	"github.com/rolegate/rolegate/upstream"
)

// The session history: every interval the HTTP server takes one sample of
// every role rolegate knows (the counts /api/roles shows) and keeps the
// last HistoryPoints of them per role, with the evictions, rejections,
// kills and dry-run decisions this instance took in between; the live page
// draws them and GET /api/history serves them.

// DefaultHistoryInterval is the time between two samples of the session
// history when Options.HistoryInterval is 0.
const DefaultHistoryInterval = 10 * time.Second

// HistoryPoints is how many samples the history keeps per role: an hour at
// the default interval.
const HistoryPoints = 360

// historyRoles is how many roles the history keeps at most: the most
// recently active. With HistoryPoints it bounds the memory the history takes
// (about 40 bytes a sample: some 3 MB at most, plus the marks).
const historyRoles = 200

// historyFailLogEvery is how often a sampler that keeps failing says so
// again, after its first line.
const historyFailLogEvery = 5 * time.Minute

// counts is one role's sessions at one sample.
type counts struct {
	Via, Elsewhere, Waiting int32
	Limit                   int32 // -1: no limit (or unknown)
}

func (c counts) busy() bool { return c.Via+c.Elsewhere+c.Waiting > 0 }

// point is one sample of one role.
type point struct {
	T time.Time
	counts
}

// mark is the decisions of one kind taken between two samples for one role.
type mark struct {
	At     time.Time // the sample that collected them, for pruning
	T      time.Time // the newest of them
	Kind   string    // eviction | rejection | kill | wait
	DryRun bool
	Count  int
}

// roleHistory is one role's samples, a ring of up to history.points, and
// its marks since the oldest sample kept.
type roleHistory struct {
	points     []point
	next       int // where the next point goes once the ring is full
	marks      []mark
	lastActive time.Time // the last sample with a session, a waiting login or a mark
	quiet      int       // samples in a row without any
}

// ordered is the points, oldest first.
func (r *roleHistory) ordered() []point {
	if len(r.points) < cap(r.points) {
		return slices.Clone(r.points)
	}
	return append(slices.Clone(r.points[r.next:]), r.points[:r.next]...)
}

func (r *roleHistory) add(p point, max int) {
	if len(r.points) < max {
		if r.points == nil {
			r.points = make([]point, 0, max)
		}
		r.points = append(r.points, p)
		return
	}
	r.points[r.next] = p
	r.next = (r.next + 1) % max
	// Marks collected before the oldest sample kept go with it.
	oldest := r.points[r.next].T
	r.marks = slices.DeleteFunc(r.marks, func(m mark) bool { return m.At.Before(oldest) })
}

// history is the samples of every role; its methods are safe for concurrent
// use. It holds no I/O: the sampler feeds it.
type history struct {
	points   int // per role
	maxRoles int

	mu    sync.Mutex
	roles map[string]*roleHistory
}

func newHistory(points, maxRoles int) *history {
	return &history{points: points, maxRoles: maxRoles, roles: map[string]*roleHistory{}}
}

// add records one sample taken at at: the counts of the roles sampled and
// the events since the previous sample. A role starts a history when it has
// a session, a waiting login or an event; one without any for as many
// samples as the history keeps is dropped; beyond maxRoles the least
// recently active are dropped.
func (h *history) add(at time.Time, sampled map[string]counts, events []proxy.Event) {
	marks := marksOf(at, events)
	h.mu.Lock()
	defer h.mu.Unlock()
	names := map[string]bool{}
	for r := range sampled {
		names[r] = true
	}
	for r := range marks {
		names[r] = true
	}
	for r := range h.roles {
		names[r] = true
	}
	for name := range names {
		c, ok := sampled[name]
		if !ok {
			c = counts{Limit: -1} // no longer known: nothing to count
		}
		m := marks[name]
		active := c.busy() || len(m) > 0
		rh := h.roles[name]
		if rh == nil {
			if !active {
				continue
			}
			rh = &roleHistory{}
			h.roles[name] = rh
		}
		rh.add(point{T: at, counts: c}, h.points)
		rh.marks = append(rh.marks, m...)
		if active {
			rh.lastActive, rh.quiet = at, 0
		} else if rh.quiet++; rh.quiet >= h.points {
			delete(h.roles, name) // nothing in all it would show
		}
	}
	if len(h.roles) <= h.maxRoles {
		return
	}
	byRecent := make([]string, 0, len(h.roles))
	for name := range h.roles {
		byRecent = append(byRecent, name)
	}
	slices.SortFunc(byRecent, func(a, b string) int {
		if c := h.roles[b].lastActive.Compare(h.roles[a].lastActive); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	for _, name := range byRecent[h.maxRoles:] {
		delete(h.roles, name)
	}
}

// marksOf groups events by role, kind and dry run. An event counts under
// the role of the login it decided on; a kill, which has none, under its
// victim's role.
func marksOf(at time.Time, events []proxy.Event) map[string][]mark {
	type key struct {
		role, kind string
		dry        bool
	}
	byKey := map[key]*mark{}
	var order []key
	for _, e := range events {
		role := e.Role
		if role == "" {
			role = e.VictimRole
		}
		if role == "" {
			continue
		}
		k := key{role, e.Kind, e.DryRun}
		m := byKey[k]
		if m == nil {
			m = &mark{At: at, T: e.Time, Kind: e.Kind, DryRun: e.DryRun}
			byKey[k] = m
			order = append(order, k)
		}
		m.Count++
		if e.Time.After(m.T) {
			m.T = e.Time
		}
	}
	out := map[string][]mark{}
	for _, k := range order {
		out[k.role] = append(out[k.role], *byKey[k])
	}
	return out
}

// historyView is GET /api/history.
type historyView struct {
	Taken           time.Time         `json:"taken"`            // the server's time now: the right end of the charts
	IntervalSeconds float64           `json:"interval_seconds"` // between two samples
	Points          int               `json:"points"`           // how many samples a role keeps at most
	Roles           []roleHistoryView `json:"roles"`
}

type roleHistoryView struct {
	Role   string          `json:"role"`
	Points []historyPoint  `json:"points"` // oldest first
	Events []historyMarker `json:"events"` // oldest first
}

type historyPoint struct {
	T           time.Time `json:"t"`
	ViaRolegate int32     `json:"via_rolegate"`
	Elsewhere   int32     `json:"elsewhere"`
	Waiting     int32     `json:"waiting"`
	Limit       *int32    `json:"limit"` // null: none or unknown
}

// historyMarker is the events of one kind between two samples.
type historyMarker struct {
	T      time.Time `json:"t"` // the newest of them
	Kind   string    `json:"kind"`
	DryRun bool      `json:"dry_run"`
	Count  int       `json:"count"`
}

// view copies the history of role ("" for every role), sorted by role.
func (h *history) view(role string) []roleHistoryView {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := []roleHistoryView{}
	for name, rh := range h.roles {
		if role != "" && name != role {
			continue
		}
		v := roleHistoryView{Role: name, Points: make([]historyPoint, 0, len(rh.points)),
			Events: make([]historyMarker, 0, len(rh.marks))}
		for _, p := range rh.ordered() {
			hp := historyPoint{T: p.T, ViaRolegate: p.Via, Elsewhere: p.Elsewhere, Waiting: p.Waiting}
			if p.Limit >= 0 {
				n := p.Limit
				hp.Limit = &n
			}
			v.Points = append(v.Points, hp)
		}
		for _, m := range rh.marks {
			v.Events = append(v.Events, historyMarker{T: m.T, Kind: m.Kind, DryRun: m.DryRun, Count: m.Count})
		}
		slices.SortStableFunc(v.Events, func(a, b historyMarker) int { return a.T.Compare(b.T) })
		out = append(out, v)
	}
	slices.SortFunc(out, func(a, b roleHistoryView) int { return strings.Compare(a.Role, b.Role) })
	return out
}

// sampler takes the samples. The HTTP server owns it: Serve runs it and
// stops it before it returns.
type sampler struct {
	opts     Options // roleViews' parts, see newSampler
	interval time.Duration
	timeout  time.Duration // bounds one sample: viewTimeout
	hist     *history
	log      *slog.Logger

	// failed is the error of the control-connection calls of the sample
	// being taken (one sample at a time: run's goroutine, or a test).
	failed error
	seen   map[eventKey]bool // the events in memory at the previous sample

	// A failing sampler logs its first failure, then at most once every
	// historyFailLogEvery with the number of failures left out, and once
	// when it works again.
	failing  bool
	lastLog  time.Time
	failures int

	running sync.Mutex // held while run runs: one sampler per server
}

func newSampler(opts Options, log *slog.Logger) *sampler {
	s := &sampler{interval: opts.HistoryInterval, timeout: viewTimeout, hist: newHistory(HistoryPoints, historyRoles), log: log}
	if s.interval <= 0 {
		s.interval = DefaultHistoryInterval
	}
	// A sample counts sessions as /api/roles does (roleViews), with one
	// ServerSessions call for every role, and no Instances call: which
	// instance relays a session does not change the counts. Errors are the
	// sampler's to log (rate-limited) and make it skip the sample.
	o := opts
	o.Instances = nil
	o.Logger = slog.New(slog.DiscardHandler)
	if opts.ServerSessions != nil {
		o.ServerSessions = func(ctx context.Context, roles []string) ([]upstream.Backend, error) {
			b, err := opts.ServerSessions(ctx, roles)
			if err != nil {
				s.failed = fmt.Errorf("list the server's sessions: %w", err)
			}
			return b, err
		}
	}
	if opts.Effective != nil {
		o.Effective = func(ctx context.Context, role, database string) (limiter.Rule, limiter.Rule, string, string, error) {
			r, d, rs, ds, err := opts.Effective(ctx, role, database)
			if err != nil && s.failed == nil {
				s.failed = fmt.Errorf("resolve the limit of role %q: %w", role, err)
			}
			return r, d, rs, ds, err
		}
	}
	s.opts = o
	return s
}

// run samples every interval until ctx ends. A second run while one runs
// returns at once.
func (s *sampler) run(ctx context.Context) {
	if !s.running.TryLock() {
		return
	}
	defer s.running.Unlock()
	tick := time.NewTicker(s.interval)
	defer tick.Stop()
	for {
		s.sample(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// sample takes one sample, bounded by s.timeout; a failed one is logged
// (rate-limited) and skipped.
func (s *sampler) sample(parent context.Context) {
	ctx, cancel := context.WithTimeout(parent, s.timeout)
	defer cancel()
	s.failed = nil
	infos := s.opts.Proxy.Sessions()
	views := s.opts.roleViews(ctx, infos, s.opts.allSessions(ctx, infos))
	if parent.Err() != nil {
		return // stopping: not a failure
	}
	if s.failed == nil && ctx.Err() != nil {
		s.failed = fmt.Errorf("sample: %w", ctx.Err())
	}
	now := time.Now()
	if s.failed != nil {
		s.failures++
		if !s.failing || now.Sub(s.lastLog) >= historyFailLogEvery {
			s.log.Warn("session history: sample skipped", "err", s.failed, "skipped_since_last", s.failures-1)
			s.failing, s.lastLog, s.failures = true, now, 0
		}
		return
	}
	if s.failing {
		s.log.Info("session history: sampling works again", "skipped_since_last", s.failures)
		s.failing, s.failures = false, 0
	}
	sampled := make(map[string]counts, len(views))
	for _, v := range views {
		c := counts{Via: int32(v.Sessions), Elsewhere: int32(v.SessionsElsewhere), Waiting: int32(v.Waiting), Limit: -1}
		if v.Limit != nil {
			c.Limit = int32(*v.Limit)
		}
		sampled[v.Role] = c
	}
	s.hist.add(now, sampled, s.newEvents())
}

// eventKey tells events apart: its time carries the monotonic clock
// reading, so two decisions practically never share one.
type eventKey struct {
	t                  time.Time
	kind, role, client string
	victim             uint32
}

// newEvents is this instance's events that were not in memory at the
// previous sample (all of them at the first), oldest first. The proxy keeps
// its last 256: more between two samples are undercounted.
func (s *sampler) newEvents() []proxy.Event {
	all := s.opts.Proxy.Events() // newest first
	cur := make(map[eventKey]bool, len(all))
	var out []proxy.Event
	for _, e := range slices.Backward(all) {
		k := eventKey{e.Time, e.Kind, e.Role, e.Client, e.VictimPID}
		cur[k] = true
		if !s.seen[k] {
			out = append(out, e)
		}
	}
	s.seen = cur
	return out
}

// historyHandler is GET /api/history[?role=name].
func (h *HTTP) historyHandler(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, historyView{Taken: time.Now(), IntervalSeconds: h.sampler.interval.Seconds(),
		Points: h.sampler.hist.points, Roles: h.sampler.hist.view(r.URL.Query().Get("role"))})
}
