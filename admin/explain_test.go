package admin

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/limiter"
)

// EXPLAIN LOGIN and /api/explain agree with what the next real login gets:
// each case explains, then logs in for real and compares. Nothing changes
// when explaining: the session it would evict is still there after.
func TestExplainLogin(t *testing.T) {
	r := startConsoleRig(t, rules{"lim_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins,
		Fallback: limiter.PolicyReject, EvictScope: limiter.EvictAny, Budget: limiter.Budget{Evictions: 60, Per: time.Minute}}})
	r.srv.SetConsole(NewConsole(Options{Proxy: r.srv, Limiter: r.limits.Limiter.Snapshot, Override: r.limits.Override,
		OverrideDryRun: r.limits.OverrideDryRun, Effective: r.limits.Effective, Explain: r.srv.Explain, Logger: r.logger}))
	base := startHTTP(t, Options{Proxy: r.srv, Explain: r.srv.Explain, Limiter: r.limits.Limiter.Snapshot, Logger: r.logger})
	ctx := t.Context()
	con := r.consolePgx(t)
	explain := func(q string) map[string][]string {
		t.Helper()
		rows, err := con.Query(ctx, q)
		if err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		out := map[string][]string{}
		for rows.Next() {
			var item, value string
			if err := rows.Scan(&item, &value); err != nil {
				t.Fatal(err)
			}
			out[item] = append(out[item], value)
		}
		if err := rows.Err(); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
		return out
	}
	api := func() explanationJSON {
		return getJSON[explanationJSON](t, base+"/api/explain?role=lim_user&database=postgres&application_name=newer")
	}

	// Nobody in: admitted, and so is the real login.
	e := explain("EXPLAIN LOGIN lim_user postgres")
	if e["outcome"][0] != "admitted" || e["role limit"][0] != "1, from proxy.toml" || e["role sessions"][0] != "0 via rolegate, 0 elsewhere" {
		t.Fatalf("explain with no session: %v", e)
	}
	if !strings.HasPrefix(e["role policy"][0], "newest-wins, fallback reject, evict_scope any, max_evictions 60/min") {
		t.Errorf("role policy line %q", e["role policy"][0])
	}
	old := r.connect(t, "lim_user", "lim_pw")
	oldPID := backendPID(t, old)

	// One session in: explain says evict it, twice (nothing changed), and
	// the API says the same; the real login evicts that very pid.
	for range 2 {
		e = explain(`explain login "lim_user" postgres newer 127.0.0.1`)
		if e["outcome"][0] != "evict" || !strings.Contains(e["verdict"][0], fmt.Sprintf("would evict pid %d (", oldPID)) ||
			e["role sessions"][0] != "1 via rolegate, 0 elsewhere" {
			t.Fatalf("explain with one session: %v", e)
		}
	}
	if j := api(); j.Outcome != "evict" || !slices.Equal(j.Victims, []uint32{oldPID}) || j.Limits[0].Source != "proxy.toml" ||
		j.Limits[0].Limit == nil || *j.Limits[0].Limit != 1 || j.Limits[1].Limit != nil {
		t.Fatalf("/api/explain: %+v", j)
	}
	var one int
	if err := old.QueryRow(ctx, "select 1").Scan(&one); err != nil {
		t.Fatalf("explaining disturbed the session: %v", err)
	}
	newer := r.connect(t, "lim_user", "lim_pw")
	var pe *pgconn.PgError
	if _, err := old.Exec(ctx, "select 1"); !errors.As(err, &pe) || pe.Code != "57P01" {
		t.Fatalf("the session explain named was not the one evicted: %v", err)
	}

	// Policy reject (an override): explain says rejected, and so it is.
	reject := limiter.PolicyReject
	r.limits.Override("lim_user", nil, &reject)
	e = explain("EXPLAIN LOGIN lim_user postgres")
	if e["outcome"][0] != "rejected" || !strings.Contains(e["role policy"][0], "reject (override)") {
		t.Fatalf("explain under reject: %v", e)
	}
	ctx2, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if c, err := pgx.Connect(ctx2, r.dsn("lim_user", "lim_pw")); err == nil {
		c.Close(ctx)
		t.Fatal("the login explain said would be rejected got in")
	} else if !errors.As(err, &pe) || pe.Code != "53300" {
		t.Fatalf("rejected login: %v", err)
	}

	// A dry run: explain admits, and says what it would have done.
	newest := limiter.PolicyNewestWins
	r.limits.Override("lim_user", nil, &newest)
	r.limits.OverrideDryRun("lim_user", true)
	e = explain("EXPLAIN LOGIN lim_user postgres")
	newerPID := backendPID(t, newer)
	if e["outcome"][0] != "admitted" || len(e["dry run"]) != 1 || !strings.Contains(e["dry run"][0], fmt.Sprintf("would evict pid %d", newerPID)) {
		t.Fatalf("explain under a dry run: %v", e)
	}
	dry := r.connect(t, "lim_user", "lim_pw")
	if err := newer.QueryRow(ctx, "select 1").Scan(&one); err != nil {
		t.Fatalf("a dry run evicted: %v", err)
	}
	dry.Close(ctx)
	// The decision it did not carry out is marked as such in SHOW
	// EVICTIONS, /api/evictions and the metrics.
	rows, err := con.Query(ctx, "SHOW EVICTIONS")
	if err != nil {
		t.Fatal(err)
	}
	marked := false
	for rows.Next() {
		v, err := rows.Values()
		if err != nil {
			t.Fatal(err)
		}
		fields := rows.FieldDescriptions()
		row := map[string]any{}
		for i, f := range fields {
			row[f.Name] = v[i]
		}
		if row["kind"] == "eviction" && row["dry_run"] == "true" && fmt.Sprint(row["victim_pid"]) == fmt.Sprint(newerPID) {
			marked = true
		}
	}
	if !marked {
		t.Error("SHOW EVICTIONS has no dry-run eviction of pid", newerPID)
	}
	evs := getJSON[[]event](t, base+"/api/evictions")
	if !slices.ContainsFunc(evs, func(e event) bool { return e.DryRun && e.Kind == "eviction" && e.VictimPID == newerPID }) {
		t.Errorf("/api/evictions has no dry-run eviction of pid %d: %+v", newerPID, evs)
	}
	metrics := want(t, http.MethodGet, base+"/metrics", "", http.StatusOK, "")
	if !strings.Contains(metrics, `rolegate_dry_run_decisions_total{decision="eviction",policy="newest-wins",role="lim_user"} 1`) {
		t.Errorf("no dry-run eviction in /metrics:\n%s", metrics)
	}

	// An operator's hold comes first, as for a real login.
	r.srv.Disable(limiter.ScopeRole, "lim_user", "test")
	if e = explain("EXPLAIN LOGIN lim_user postgres"); e["outcome"][0] != "disabled" || !strings.HasPrefix(e["verdict"][0], "rejected with 55000") {
		t.Errorf("explain of a disabled role: %v", e)
	}
	if _, err := pgx.Connect(ctx2, r.dsn("lim_user", "lim_pw")); !errors.As(err, &pe) || pe.Code != "55000" {
		t.Errorf("the login explain said is disabled: %v", err)
	}
	r.srv.Enable(limiter.ScopeRole, "lim_user", "test")
	r.srv.Pause(limiter.ScopeDatabase, "postgres", "test")
	if e = explain("EXPLAIN LOGIN lim_user postgres"); e["outcome"][0] != "paused" || !strings.Contains(e["verdict"][0], "would wait until RESUME") {
		t.Errorf("explain of a paused database: %v", e)
	}
	r.srv.Resume(limiter.ScopeDatabase, "postgres", "test")

	// Bad input is a clear error, and the console goes on.
	if _, err := con.Exec(ctx, "EXPLAIN LOGIN lim_user postgres app not-an-address"); !errors.As(err, &pe) || pe.Code != "22023" {
		t.Errorf("bad client address: %v", err)
	}
	if _, err := con.Exec(ctx, "EXPLAIN LOGIN"); !errors.As(err, &pe) || pe.Code != "42601" {
		t.Errorf("EXPLAIN LOGIN without a role: %v", err)
	}
	if code, body := call(t, http.MethodGet, base+"/api/explain", ""); code != http.StatusBadRequest || !strings.Contains(body, "role is required") {
		t.Errorf("/api/explain without a role: %d %s", code, body)
	}
	if code, _ := call(t, http.MethodGet, base+"/api/explain?role=lim_user&client=nope", ""); code != http.StatusBadRequest {
		t.Errorf("/api/explain with a bad client: %d", code)
	}
}
