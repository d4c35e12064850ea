package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/rolegate/rolegate/proxy"
)

// explainLogin answers EXPLAIN LOGIN role [database [application_name
// [client]]]: what a login would get now and why, one line per fact. The
// database defaults to the role's name, as libpq's does.
func (s *consoleSession) explainLogin(ctx context.Context, args []string) *consoleError {
	if s.c.opts.Explain == nil {
		return errorf("55000", "EXPLAIN LOGIN needs limits and the control connection ([control] dsn)")
	}
	role, db, app, client := explainArgs(args)
	ctx, cancel := viewContext(ctx)
	defer cancel()
	e, err := s.c.opts.Explain(ctx, role, db, app, client)
	if err != nil {
		return explainError(err)
	}
	var rows [][][]byte
	add := func(item, value string) { rows = append(rows, [][]byte{txt(item), txt(value)}) }
	add("login", fmt.Sprintf("role %q, database %q, application_name %q, client %s", e.Role, e.Database, e.ApplicationName, orNone(e.Client)))
	if e.Superuser {
		add("superuser", "yes: exempt from connection limits")
	}
	for _, l := range e.Limits {
		add(l.Scope+" limit", limitText(l))
		if l.Limit >= 0 {
			add(l.Scope+" sessions", fmt.Sprintf("%d via rolegate, %d elsewhere", l.ViaRolegate, l.Elsewhere))
			add(l.Scope+" policy", ruleText(l))
		}
	}
	add("outcome", e.Outcome)
	add("verdict", e.Verdict)
	for _, w := range e.Would {
		add("dry run", w)
	}
	s.table("EXPLAIN", []column{{"item", oidText}, {"value", oidText}}, rows)
	return nil
}

// explainArgs fills in the defaults: the database is the role's name.
func explainArgs(args []string) (role, db, app, client string) {
	role = args[0]
	db = role
	if len(args) > 1 {
		db = args[1]
	}
	if len(args) > 2 {
		app = args[2]
	}
	if len(args) > 3 {
		client = args[3]
	}
	return role, db, app, client
}

func explainError(err error) *consoleError {
	if errors.Is(err, proxy.ErrNoControl) {
		return errorf("55000", "EXPLAIN LOGIN needs limits and the control connection ([control] dsn)")
	}
	if errors.Is(err, proxy.ErrBadClient) {
		return errorf("22023", "%s", err.Error())
	}
	return errorf("58000", "EXPLAIN LOGIN failed: %v", err)
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// limitText is `2, from proxy.toml` or `none`.
func limitText(l proxy.LimitExplained) string {
	if l.Limit < 0 {
		return "none"
	}
	from := map[string]string{
		proxy.SourceConfig:   "proxy.toml",
		proxy.SourceOverride: "an operator's override (SET LIMIT)",
		proxy.SourceServer:   "the server (" + map[string]string{"role": "rolconnlimit", "database": "datconnlimit"}[l.Scope] + ")",
	}[l.Source]
	if from == "" {
		from = l.Source
	}
	return fmt.Sprintf("%d, from %s", l.Limit, from)
}

// ruleText is the policy and the rest of the rule in one line.
func ruleText(l proxy.LimitExplained) string {
	s := l.Policy
	if l.PolicySource == proxy.SourceOverride {
		s += " (override)"
	}
	if l.DryRun {
		s += ", dry run"
	}
	s += ", fallback " + l.Fallback + ", evict_scope " + l.EvictScope + ", max_evictions " + l.MaxEvictions
	if len(l.Protect) > 0 {
		s += ", protect " + strings.Join(l.Protect, " ")
	}
	return s
}

// explain is GET /api/explain?role=&database=&application_name=&client=.
func (h *HTTP) explain(w http.ResponseWriter, r *http.Request) {
	if h.opts.Explain == nil {
		writeError(w, http.StatusNotImplemented, "explain needs limits and the control connection")
		return
	}
	q := r.URL.Query()
	if q.Get("role") == "" {
		writeError(w, http.StatusBadRequest, "role is required")
		return
	}
	args := []string{q.Get("role")}
	for _, k := range []string{"database", "application_name", "client"} {
		args = append(args, q.Get(k))
	}
	role, db, app, client := explainArgs(args)
	if q.Get("database") == "" {
		db = role
	}
	ctx, cancel := viewContext(r.Context())
	defer cancel()
	e, err := h.opts.Explain(ctx, role, db, app, client)
	if err != nil {
		status := http.StatusBadGateway
		if errors.Is(err, proxy.ErrBadClient) {
			status = http.StatusBadRequest
		}
		writeError(w, status, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, explainJSON(e))
}

type limitJSON struct {
	Scope        string   `json:"scope"`
	Name         string   `json:"name"`
	Limit        *int     `json:"limit"` // null: no limit
	Source       string   `json:"source"`
	Policy       string   `json:"policy"`
	PolicySource string   `json:"policy_source"`
	Fallback     string   `json:"fallback"`
	DryRun       bool     `json:"dry_run"`
	EvictScope   string   `json:"evict_scope"`
	MaxEvictions string   `json:"max_evictions"`
	Protect      []string `json:"protect"`
	ViaRolegate  int      `json:"sessions_via_rolegate"`
	Elsewhere    int      `json:"sessions_elsewhere"`
}

type explanationJSON struct {
	Role            string      `json:"role"`
	Database        string      `json:"database"`
	ApplicationName string      `json:"application_name"`
	Client          string      `json:"client,omitempty"`
	Superuser       bool        `json:"superuser"`
	Limits          []limitJSON `json:"limits"`
	Outcome         string      `json:"outcome"` // admitted | evict | wait | rejected | disabled | paused
	Victims         []uint32    `json:"victims"`
	Verdict         string      `json:"verdict"`
	Reason          string      `json:"reason"`
	DryRun          []string    `json:"dry_run"`
}

func explainJSON(e proxy.Explanation) explanationJSON {
	out := explanationJSON{Role: e.Role, Database: e.Database, ApplicationName: e.ApplicationName, Client: e.Client,
		Superuser: e.Superuser, Outcome: e.Outcome, Victims: e.Victims, Verdict: e.Verdict, Reason: e.Reason,
		DryRun: e.Would, Limits: []limitJSON{}}
	if out.Victims == nil {
		out.Victims = []uint32{}
	}
	if out.DryRun == nil {
		out.DryRun = []string{}
	}
	for _, l := range e.Limits {
		j := limitJSON{Scope: l.Scope, Name: l.Name, Source: l.Source, Policy: l.Policy, PolicySource: l.PolicySource,
			Fallback: l.Fallback, DryRun: l.DryRun, EvictScope: l.EvictScope, MaxEvictions: l.MaxEvictions,
			Protect: l.Protect, ViaRolegate: l.ViaRolegate, Elsewhere: l.Elsewhere}
		if l.Limit >= 0 {
			n := l.Limit
			j.Limit = &n
		}
		out.Limits = append(out.Limits, j)
	}
	return out
}
