package admin

import (
	"cmp"
	"embed"
	"io/fs"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// static holds the live page: plain HTML, CSS and JavaScript, no build step.
//
//go:embed static
var static embed.FS

// page is GET /api/page: everything the live page at / shows, in one
// snapshot, so one poll redraws it all.
type page struct {
	Taken    time.Time  `json:"taken"`
	Limits   bool       `json:"limits"` // false when no limits are enforced
	Roles    []pageRole `json:"roles"`
	Sessions []session  `json:"sessions"`
	Events   []event    `json:"events"` // newest first
}

// pageRole is a role in /api/page: /api/roles' fields and, when an operator
// override (SET LIMIT / SET POLICY) is in force, its limit and policy. The
// limiter snapshot does not carry the configured limits, so without an
// override Limit is null.
type pageRole struct {
	role
	Limit        *int   `json:"limit"`
	LimitSource  string `json:"limit_source,omitempty"` // "override" when Limit is set
	Policy       string `json:"policy,omitempty"`       // the override's; the counters name the policies that decided
	PolicySource string `json:"policy_source,omitempty"`
}

// registerPage adds the live page, its assets and its JSON to mux.
func (h *HTTP) registerPage(mux *http.ServeMux) {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic(err) // the embedded tree is fixed at build time
	}
	index, err := fs.ReadFile(sub, "index.html")
	if err != nil {
		panic(err)
	}
	// "/{$}" is / alone: other unknown paths stay 404.
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; img-src 'self' data:")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		_, _ = w.Write(index)
	})
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(sub)))
	mux.HandleFunc("GET /api/page", h.page)
}

func (h *HTTP) page(w http.ResponseWriter, _ *http.Request) {
	infos := h.opts.Proxy.Sessions()
	slices.SortFunc(infos, func(a, b proxy.SessionInfo) int { return a.Start.Compare(b.Start) })
	p := page{Taken: time.Now(), Limits: h.opts.Limiter != nil, Roles: []pageRole{}, Sessions: make([]session, 0, len(infos))}

	byName := map[string]*pageRole{}
	get := func(name string) *pageRole {
		r := byName[name]
		if r == nil {
			r = &pageRole{role: role{Role: name, Policies: []counter{}}}
			byName[name] = r
		}
		return r
	}
	for _, s := range infos {
		p.Sessions = append(p.Sessions, session{
			ID: s.ID, PID: s.BackendPID, Role: s.User, Database: s.Database, ApplicationName: s.ApplicationName,
			ClientAddr: s.ClientAddr, ClientTLS: s.ClientTLS, ServerTLS: s.ServerTLS, Replication: s.Replication,
			State: s.State.String(), Started: s.Start, LastActivity: s.LastActivity,
			BytesIn: s.BytesIn, BytesOut: s.BytesOut,
		})
		if s.User != "" {
			get(s.User).Sessions++
		}
	}
	if h.opts.Limiter != nil {
		snap := h.opts.Limiter()
		for name, n := range snap.WaitingByRole {
			get(name).Waiting = n
		}
		keys := slices.Collect(maps.Keys(snap.Counters))
		slices.SortFunc(keys, func(a, b limiter.CounterKey) int {
			return cmp.Or(cmp.Compare(a.Role, b.Role), cmp.Compare(a.Policy, b.Policy))
		})
		for _, k := range keys {
			c := snap.Counters[k]
			r := get(k.Role)
			r.Policies = append(r.Policies, counter{
				Policy: string(k.Policy), Admitted: c.Admitted, Evictions: c.Evictions, EvictFailures: c.EvictFailures,
				Rejections: c.Rejections, Waits: c.Waits, WaitTimeouts: c.WaitTimeouts,
			})
		}
	}
	if h.opts.Overrides != nil {
		for name, o := range h.opts.Overrides() {
			r := get(name)
			if o.MaxSessions != nil {
				n := *o.MaxSessions
				r.Limit, r.LimitSource = &n, "override"
			}
			if o.Policy != nil {
				r.Policy, r.PolicySource = string(*o.Policy), "override"
			}
		}
	}
	for _, r := range byName {
		p.Roles = append(p.Roles, *r)
	}
	slices.SortFunc(p.Roles, func(a, b pageRole) int { return strings.Compare(a.Role, b.Role) })

	events := h.opts.Proxy.Events()
	p.Events = make([]event, 0, len(events))
	for _, e := range events {
		p.Events = append(p.Events, event{
			Time: e.Time, Kind: e.Kind, Role: e.Role, Database: e.Database, Client: e.Client,
			Policy: e.Policy, Scope: e.Scope, VictimPID: e.VictimPID, VictimRole: e.VictimRole,
			VictimClient: e.VictimClient, ViaRolegate: e.ViaRolegate, Reason: e.Reason,
		})
	}
	writeJSON(w, http.StatusOK, p)
}
