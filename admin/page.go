package admin

import (
	"embed"
	"io/fs"
	"net/http"
	"time"

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
	// Unlisted counts the connections that have not authenticated yet and
	// are left out of Sessions (all but the maxUnverifiedListed oldest).
	Unlisted int     `json:"unlisted"`
	Events   []event `json:"events"` // newest first
}

// pageRole is a role in /api/page: /api/roles' fields (with its effective
// limit, its source and its policy) and where the policy comes from
// ("override" while a SET POLICY is in force).
type pageRole struct {
	role
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

func (h *HTTP) page(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	infos := h.opts.Proxy.Sessions()
	p := page{Taken: time.Now(), Limits: h.opts.Limiter != nil, Roles: []pageRole{}}
	all := h.opts.allSessions(ctx, infos)
	p.Sessions, p.Unlisted = listed(all)
	var ovr map[string]proxy.Override
	if h.opts.Overrides != nil {
		ovr = h.opts.Overrides()
	}
	for _, rv := range h.opts.roleViews(ctx, infos, all) {
		pr := pageRole{role: rv}
		if o, ok := ovr[rv.Role]; ok && o.Policy != nil {
			pr.PolicySource = "override"
		}
		p.Roles = append(p.Roles, pr)
	}

	p.Events = h.events(ctx)
	writeJSON(w, http.StatusOK, p)
}
