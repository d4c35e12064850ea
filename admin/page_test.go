package admin

import (
	"context"
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/jackc/pgx/v5"

	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

const chromiumPath = "/usr/bin/chromium"

var (
	chromiumOnce sync.Once
	chromiumErr  error
)

// needChromium returns Debian's chromium, installing it with apt-get (once
// per test process) when it is missing and we are root. The test fails, and
// does not skip, when it cannot be had.
func needChromium(t *testing.T) string {
	t.Helper()
	chromiumOnce.Do(func() {
		if _, err := os.Stat(chromiumPath); err == nil {
			return
		}
		if os.Geteuid() != 0 {
			chromiumErr = errors.New(chromiumPath + " is missing and the test is not root, so it cannot run apt-get install -y chromium")
			return
		}
		t.Logf("%s is missing: installing Debian's chromium with apt-get (this takes a while)", chromiumPath)
		for _, args := range [][]string{{"update"}, {"install", "-y", "--no-install-recommends", "chromium"}} {
			cmd := exec.Command("apt-get", args...)
			cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
			if out, err := cmd.CombinedOutput(); err != nil {
				chromiumErr = errors.New("apt-get " + strings.Join(args, " ") + ": " + err.Error() + "\n" + lastLines(string(out), 20))
				return
			}
		}
		if _, err := os.Stat(chromiumPath); err != nil {
			chromiumErr = errors.New("apt-get install chromium left no " + chromiumPath)
		}
	})
	if chromiumErr != nil {
		t.Fatalf("Chromium cannot be installed, so the browser test cannot run: %v", chromiumErr)
	}
	return chromiumPath
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// The live page in a real headless Chromium, against a real proxy and a real
// server: the API refuses a name a DNS-rebinding page would use, the page
// opened under a name in allowed_hosts goes live, a new session appears, its
// eviction by a newer login shows up, a login waiting for a slot fills the
// waiting bar and is listed with what it waits for, a login stuck in
// authentication is listed without a name, a screenshot is saved, and the
// page says "disconnected" once the admin HTTP server is gone. Over time,
// the roles' charts are drawn with their samples, an eviction mark, a
// rejection mark, and a dry-run decision's mark hollow.
func TestLivePage(t *testing.T) {
	chromium := needChromium(t)
	r := startRigWith(t, rules{
		"page_user":        {MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject},
		"page_wait_user":   {MaxSessions: 1, Policy: limiter.PolicyWait, Fallback: limiter.PolicyReject, WaitTimeout: 5 * time.Minute},
		"page_reject_user": {MaxSessions: 1, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject},
		"page_dry_user":    {MaxSessions: 1, Policy: limiter.PolicyReject, Fallback: limiter.PolicyReject, DryRun: true},
		"page_thrash_user": {MaxSessions: 1, Policy: limiter.PolicyNewestWins, Fallback: limiter.PolicyReject,
			Budget: limiter.Budget{Evictions: 1, Per: time.Hour}},
	}, func(c *proxy.Config) {
		c.StartupTimeout = 5 * time.Minute // rolegate never ends the stuck login itself
	})
	for _, q := range []string{"create role page_user login password 'page_pw'",
		"create role page_wait_user login password 'page_wait_pw'",
		"create role report_user login password 'report_pw' connection limit 3",
		"create role page_reject_user login password 'page_reject_pw'",
		"create role page_dry_user login password 'page_dry_pw'",
		"create role page_thrash_user login password 'page_thrash_pw'"} {
		if err := r.cluster.Exec(t.Context(), q); err != nil {
			t.Fatal(err)
		}
	}
	// The admin HTTP server, stopped by hand halfway through.
	h := New(Options{Proxy: r.srv, HistoryInterval: 200 * time.Millisecond, Limiter: r.limits.Limiter.Snapshot, Overrides: r.limits.Overrides,
		Effective: r.limits.Effective, ServerSessions: r.control.Sessions, Logger: r.logger,
		AllowedHosts: []string{"rolegate.internal"}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- h.Serve(ln) }()
	stopHTTP := sync.OnceFunc(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := h.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve returned %v, want http.ErrServerClosed", err)
		}
	})
	t.Cleanup(stopHTTP)
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	// The browser resolves two names to the listener: one in allowed_hosts,
	// which the page is opened with, and one as a DNS-rebinding page would
	// use, which is refused.
	base := "http://rolegate.internal:" + port

	// This machine's network is closed: without these flags Chromium hangs
	// on connections of its own.
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("host-resolver-rules", "MAP rolegate.internal 127.0.0.1, MAP rebound.example.com 127.0.0.1"),
		chromedp.UserDataDir(filepath.Join(t.TempDir(), "chromium")),
		chromedp.WindowSize(1280, 800),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc() // waits for the browser process to exit
	ctx, cancelBrowser := chromedp.NewContext(allocCtx, chromedp.WithErrorf(t.Logf))
	defer func() {
		if err := chromedp.Cancel(ctx); err != nil { // closes the browser gracefully
			t.Logf("closing the browser: %v", err)
		}
		cancelBrowser()
	}()
	// The first Run starts the browser: its context must carry no timeout
	// (one would stop the browser), so the deadlines are per query below.
	if err := chromedp.Do(ctx, chromedp.Navigate("http://rebound.example.com:"+port+"/api/sessions")); err != nil {
		t.Fatalf("open /api/sessions under a rebound name: %v", err)
	}
	waitText(t, ctx, "body", `does not answer for host \"rebound.example.com:`+port+`\"`)
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/")); err != nil {
		t.Fatalf("open the page: %v", err)
	}
	waitText(t, ctx, "#status", "live")

	first := r.connect(t, "page_user", "page_pw")
	firstPID := backendPID(t, first)
	pidText := itoa(firstPID)
	waitText(t, ctx, "#sessions tbody", pidText, "page_user", "postgres", "idle")
	waitText(t, ctx, "#roles", "page_user", "1 via rolegate + 0 elsewhere of 1 (proxy.toml)", "newest-wins")

	second := r.connect(t, "page_user", "page_pw") // newest wins: first is evicted
	wantTerminated(t, first, "the evicted session")
	secondPID := backendPID(t, second)
	waitText(t, ctx, "#events tbody", "eviction", "page_user", "pid "+pidText, "newest-wins")
	waitText(t, ctx, "#sessions tbody", itoa(secondPID))
	chart := `svg.history[data-role="page_user"]`
	waitJS(t, ctx, "page_user's chart with its samples and the eviction", `(() => {
		const c = document.querySelector('`+chart+`');
		return c != null && +c.dataset.points >= 1 && c.querySelector("polygon.series.via").getAttribute("points") !== "" &&
			c.querySelector(".mark.eviction:not(.dry-run)") != null && c.querySelector("polyline.limit") != null;
	})()`)
	// A dry-run reject rule lets the second login in, and the page marks
	// the rejection it would have made: hollow on the chart, "would
	// reject (dry run)" in the events.
	r.connect(t, "page_dry_user", "page_dry_pw")
	r.connect(t, "page_dry_user", "page_dry_pw")
	dryChart := `svg.history[data-role="page_dry_user"]`
	waitJS(t, ctx, "page_dry_user's dry-run rejection drawn hollow, page_user's eviction filled", `(() => {
		const fill = (c, sel) => { const m = document.querySelector(c + ' ' + sel + ' > :not(line)'); return m && getComputedStyle(m).fill; };
		return fill('`+dryChart+`', ".mark.rejection.dry-run") === "rgb(255, 255, 255)" &&
			![null, "none", "rgb(255, 255, 255)"].includes(fill('`+chart+`', ".mark.eviction"));
	})()`)
	waitJS(t, ctx, "the dry-run rejection in the events", `[...document.querySelectorAll('#events tbody tr[data-dry-run="true"]')].some(
		(tr) => tr.textContent.includes("would reject (dry run)") && tr.textContent.includes("page_dry_user"))`)
	// A pool evicting itself past its budget: the role is flagged thrashing.
	r.connect(t, "page_thrash_user", "page_thrash_pw")
	r.connect(t, "page_thrash_user", "page_thrash_pw") // spends the budget of 1/hour
	tctx, tcancel := context.WithTimeout(t.Context(), 15*time.Second)
	if c, err := pgx.Connect(tctx, r.dsn("page_thrash_user", "page_thrash_pw")); err == nil {
		c.Close(tctx)
		t.Error("a login past the eviction budget was let in")
	}
	tcancel()
	waitJS(t, ctx, "page_thrash_user flagged thrashing", `(() => {
		const f = document.querySelector('#roles .role[data-role="page_thrash_user"] .flag.thrashing');
		return f != null && f.title.includes("@127.0.0.1");
	})()`)
	r.connect(t, "page_reject_user", "page_reject_pw")
	cctx, ccancel := context.WithTimeout(t.Context(), 15*time.Second)
	if c, err := pgx.Connect(cctx, r.dsn("page_reject_user", "page_reject_pw")); err == nil {
		c.Close(cctx)
		t.Error("a second login of page_reject_user was let in")
	}
	ccancel()
	waitJS(t, ctx, "page_reject_user's chart with its rejection", `document.querySelector('svg.history[data-role="page_reject_user"] .mark.rejection:not(.dry-run)') != null`)
	// A role limited by the server only, with a session opened directly
	// against the server.
	r.connect(t, "report_user", "report_pw")
	dctx, dcancel := context.WithTimeout(t.Context(), 15*time.Second)
	defer dcancel()
	direct, err := pgx.Connect(dctx, r.cluster.DSN("report_user", "report_pw", "postgres"))
	if err != nil {
		t.Fatalf("direct connection: %v", err)
	}
	defer direct.Close(context.Background())
	waitText(t, ctx, "#roles", "report_user", "1 via rolegate + 1 elsewhere of 3 (server), 0 waiting")
	waitText(t, ctx, "#sessions tbody", itoa(backendPID(t, direct)), "elsewhere")
	got := pageText(t, ctx, "#sessions tbody")
	for line := range strings.Lines(got) {
		if strings.HasPrefix(line, pidText+"\t") {
			t.Errorf("the evicted pid %d is still listed: %q", firstPID, got)
		}
	}

	// A login waiting for a slot, and one that never answers the password
	// request.
	holder := r.connect(t, "page_wait_user", "page_wait_pw")
	waited := make(chan error, 1)
	go func() {
		wctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		c, err := pgx.Connect(wctx, r.dsn("page_wait_user", "page_wait_pw"))
		if err == nil {
			c.Close(wctx)
		}
		waited <- err
	}()
	waitText(t, ctx, "#roles", "page_wait_user", "1 via rolegate + 0 elsewhere of 1 (proxy.toml), 1 waiting")
	waitText(t, ctx, "#sessions tbody", `waiting for a slot of role "page_wait_user" (limit 1, 1st in line)`)
	stuck := stuckInAuthentication(t, r.addr, "page_user")
	waitText(t, ctx, "#sessions tbody", "(not authenticated)", "authenticating")
	if got := pageText(t, ctx, "#sessions tbody"); strings.Contains(got, "claimed") {
		t.Errorf("the page shows what an unauthenticated client claims: %q", got)
	}

	shotCtx, cancelShot := context.WithTimeout(ctx, 20*time.Second)
	defer cancelShot()
	png, err := chromedp.Run(shotCtx, chromedp.FullScreenshot(100)) // 100: PNG; lower is JPEG
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	shot := filepath.Join(t.TempDir(), "live-page.png")
	if err := os.WriteFile(shot, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s (%d bytes)", shot, len(png))
	if p := os.Getenv("ROLEGATE_SCREENSHOT"); p != "" {
		if err := os.WriteFile(p, png, 0o644); err != nil {
			t.Fatalf("ROLEGATE_SCREENSHOT: %v", err)
		}
		t.Logf("screenshot also saved to %s", p)
	}
	stuck.Close()
	holder.Close(t.Context())
	if err := <-waited; err != nil {
		t.Errorf("the waiting login: %v", err)
	}
	waitText(t, ctx, "#roles", "page_wait_user", "0 via rolegate + 0 elsewhere of 1 (proxy.toml), 0 waiting")

	stopHTTP()
	waitText(t, ctx, "#status", "disconnected")
}

// waitJS polls the page until the JavaScript expression is true, or fails
// after a deadline with the charts' markup.
func waitJS(t *testing.T, ctx context.Context, what, expr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		ok, err := chromedp.Run(qctx, chromedp.Evaluate[bool](expr))
		cancel()
		if err != nil {
			t.Fatalf("waiting for %s: %v", what, err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			qctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			markup, _ := chromedp.Run(qctx, chromedp.OuterHTML(chromedp.CSS("#history")))
			cancel()
			t.Fatalf("the page never showed %s; #history is:\n%s", what, markup)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func itoa(n uint32) string { return strconv.FormatUint(uint64(n), 10) }

// pageText is the visible text of the first element matching sel.
func pageText(t *testing.T, ctx context.Context, sel string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.Text(chromedp.CSS(sel)))
	if err != nil {
		t.Fatalf("read %s: %v", sel, err)
	}
	return s
}

// waitText polls the page until sel's text holds every part, or fails after
// a deadline with what the page showed.
func waitText(t *testing.T, ctx context.Context, sel string, parts ...string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		got := pageText(t, ctx, sel)
		missing := ""
		for _, p := range parts {
			if !strings.Contains(got, p) {
				missing = p
				break
			}
		}
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the page's %s never showed %q; it shows %q", sel, missing, got)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The page and its assets are served from the embedded files, and /api/page
// carries an override's limit; other paths stay 404.
func TestPageServed(t *testing.T) {
	limit := 3
	policy := limiter.PolicyReject
	base := startHTTP(t, Options{
		Proxy:   proxy.New(proxy.Config{}),
		Limiter: limiter.New(time.Now).Snapshot,
		Overrides: func() map[string]proxy.Override {
			return map[string]proxy.Override{"ov_user": {MaxSessions: &limit, Policy: &policy}}
		},
	})
	want(t, http.MethodGet, base+"/", "", http.StatusOK, "<title>rolegate</title>")
	want(t, http.MethodGet, base+"/static/page.js", "", http.StatusOK, "/api/page")
	want(t, http.MethodGet, base+"/static/page.css", "", http.StatusOK, ".status.disconnected")
	want(t, http.MethodGet, base+"/static/history.js", "", http.StatusOK, "/api/history")
	want(t, http.MethodGet, base+"/", "", http.StatusOK, `<script src="/static/history.js" defer>`)
	want(t, http.MethodGet, base+"/static/nothing.js", "", http.StatusNotFound, "")
	want(t, http.MethodGet, base+"/index", "", http.StatusNotFound, "")
	if got, _ := call(t, http.MethodPost, base+"/", ""); got != http.StatusMethodNotAllowed {
		t.Errorf("POST /: %d, want 405", got)
	}
	p := getJSON[struct {
		Limits   bool       `json:"limits"`
		Roles    []pageRole `json:"roles"`
		Sessions []session  `json:"sessions"`
		Events   []event    `json:"events"`
	}](t, base+"/api/page")
	if !p.Limits || len(p.Roles) != 1 || p.Roles[0].Role != "ov_user" || p.Roles[0].Limit == nil || *p.Roles[0].Limit != 3 ||
		p.Roles[0].LimitSource != "override" || p.Roles[0].Policy != "reject" || p.Sessions == nil || p.Events == nil {
		t.Errorf("/api/page = %+v", p)
	}
}
