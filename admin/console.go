package admin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/rolegate/rolegate/internal/wire"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/proxy"
)

// Console is rolegate's admin console: the conversation with a psql (or pgx)
// client that connected to the console database, after the proxy has
// authenticated it and sent the greeting. It speaks the simple query protocol
// only and answers each command with real RowDescription and DataRow
// messages, so psql prints tables and drivers can scan them.
//
// Commands (case-insensitive, several per query separated by ';'):
//
//	SHOW HELP | SESSIONS | ROLES | DATABASES | EVICTIONS | INSTANCES | CONFIG | STATS | VERSION
//	KILL <pid>
//	KILL ROLE <role>
//	PAUSE | RESUME | DISABLE | ENABLE  ROLE <role> | DATABASE <database>
//	SET LIMIT <role> <n>
//	SET POLICY <role> <policy> [DRY RUN]
//	EXPLAIN LOGIN <role> [<database> [<application_name> [<client address>]]]
//	RELOAD
//	SHUTDOWN [WAIT]
//
// Role names are taken as written; double quotes allow spaces and ';'.
type Console struct {
	opts Options
	log  *slog.Logger
}

// NewConsole builds a console from the same Options as the HTTP server
// (Proxy is required; Limiter, Reload, ConfigText, Override, Overrides,
// Effective, ServerSessions and ConfiguredRoles may be nil).
func NewConsole(opts Options) *Console {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Console{opts: opts, log: opts.Logger.With("component", "admin-console")}
}

// maxConsoleQuery bounds one message from a console client.
const maxConsoleQuery = 1 << 20

// consoleHint lists the commands, for syntax errors.
const consoleHint = "commands: SHOW SESSIONS | ROLES | DATABASES | EVICTIONS | INSTANCES | CONFIG | STATS | VERSION | HELP; " +
	"KILL <pid>; KILL ROLE <role>; PAUSE | RESUME | DISABLE | ENABLE ROLE <role> | DATABASE <database>; " +
	"SET LIMIT <role> <n>; SET POLICY <role> <policy> [DRY RUN]; EXPLAIN LOGIN <role> [<database> [<application_name> [<client>]]]; RELOAD; SHUTDOWN [WAIT]"

// ServeConsole owns the conversation until the client leaves (Terminate or a
// closed socket: nil) or ctx ends (the client is told with a FATAL 57P01 and
// ctx's cause is returned). r holds bytes the client sent ahead; the greeting
// up to the first ReadyForQuery has been sent. conn is not closed here.
func (c *Console) ServeConsole(ctx context.Context, conn net.Conn, r *bufio.Reader, user string) error {
	if r == nil {
		r = bufio.NewReader(conn)
	}
	// A read ends at once; a write to a client that does not read gets the
	// time the FATAL below gets, so that ctx's end cannot hang on it.
	stop := context.AfterFunc(ctx, func() {
		_ = conn.SetReadDeadline(time.Unix(1, 0))
		_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
	})
	defer stop()
	s := &consoleSession{c: c, conn: conn, by: "console user " + user}
	skipping := false // after an extended-protocol error, until Sync
	for {
		m, err := wire.ReadMessage(r, maxConsoleQuery)
		if err != nil {
			if ctx.Err() != nil {
				s.out = wire.Encode(s.out[:0], wire.Error("FATAL", "57P01", "terminating connection due to administrator command"))
				_ = conn.SetWriteDeadline(time.Now().Add(time.Second))
				_ = s.flush()
				return context.Cause(ctx)
			}
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
				errors.Is(err, os.ErrDeadlineExceeded) {
				return nil
			}
			// A length PostgreSQL would refuse: the stream cannot be followed.
			s.out = wire.Encode(s.out[:0], wire.Error("FATAL", "08P01", err.Error()))
			_ = s.flush()
			return fmt.Errorf("console: %w", err)
		}
		switch m.Type {
		case 'X':
			return nil
		case 'S':
			skipping = false
			s.ready()
		case 'P', 'B', 'D', 'E', 'C', 'H':
			if !skipping {
				skipping = true
				s.error("0A000", "the rolegate console accepts only simple queries", "")
				if err := s.flush(); err != nil {
					return nil
				}
			}
			continue
		case 'Q':
			if skipping {
				continue
			}
			q := m.Body
			if n := len(q); n > 0 && q[n-1] == 0 {
				q = q[:n-1]
			}
			s.query(ctx, string(q))
			s.ready()
		default:
			if skipping {
				continue
			}
			s.error("08P01", fmt.Sprintf("unexpected message type %q on the rolegate console", m.Type), "")
			s.ready()
		}
		if err := s.flush(); err != nil {
			return nil // the client went away
		}
		if after := s.after; after != nil { // once the answer is out (SHUTDOWN)
			s.after = nil
			after()
		}
	}
}

// consoleSession is one console conversation: its output waits in out until
// the next flush (at ReadyForQuery).
type consoleSession struct {
	c    *Console
	conn net.Conn
	by   string // "console user <user>", for kills and log lines
	out  []byte
	// after runs once the answer to the current query has been flushed.
	after func()
}

func (s *consoleSession) flush() error {
	if len(s.out) == 0 {
		return nil
	}
	_, err := s.conn.Write(s.out)
	s.out = s.out[:0]
	return err
}

func (s *consoleSession) send(m pgproto3.Message) { s.out = wire.Encode(s.out, m) }

func (s *consoleSession) ready() { s.send(&pgproto3.ReadyForQuery{TxStatus: 'I'}) }

func (s *consoleSession) error(code, msg, hint string) {
	e := wire.Error("ERROR", code, msg)
	e.Hint = hint
	s.send(e)
}

func (s *consoleSession) notice(msg string) {
	s.send(&pgproto3.NoticeResponse{Severity: "NOTICE", SeverityUnlocalized: "NOTICE", Code: "00000", Message: msg})
}

// consoleError is a command's failure, sent as an ErrorResponse.
type consoleError struct{ code, msg, hint string }

func (e *consoleError) Error() string { return e.msg }

func errorf(code, format string, args ...any) *consoleError {
	return &consoleError{code: code, msg: fmt.Sprintf(format, args...)}
}

func syntaxError() *consoleError {
	return &consoleError{code: "42601", msg: "syntax error in rolegate console command", hint: consoleHint}
}

// query runs each statement of one Query message; the first error ends it, as
// in PostgreSQL.
func (s *consoleSession) query(ctx context.Context, q string) {
	stmts, err := splitStatements(q)
	if err != nil {
		s.error(err.code, err.msg, err.hint)
		return
	}
	if len(stmts) == 0 {
		s.send(&pgproto3.EmptyQueryResponse{})
		return
	}
	for _, words := range stmts {
		if err := s.run(ctx, words); err != nil {
			s.error(err.code, err.msg, err.hint)
			return
		}
	}
}

// splitStatements splits a query into statements on ';' and each statement
// into words on white space; double quotes keep spaces and ';' in a word ("" is
// a quote inside). Empty statements are dropped.
func splitStatements(q string) ([][]string, *consoleError) {
	var stmts [][]string
	var words []string
	var word strings.Builder
	inWord, quoted := false, false
	endWord := func() {
		if inWord {
			words = append(words, word.String())
			word.Reset()
			inWord = false
		}
	}
	for i := 0; i < len(q); i++ {
		ch := q[i]
		switch {
		case quoted:
			if ch == '"' {
				if i+1 < len(q) && q[i+1] == '"' {
					word.WriteByte('"')
					i++
				} else {
					quoted = false
				}
			} else {
				word.WriteByte(ch)
			}
		case ch == '"':
			quoted, inWord = true, true
		case ch == ';':
			endWord()
			if len(words) > 0 {
				stmts = append(stmts, words)
			}
			words = nil
		case ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v':
			endWord()
		default:
			word.WriteByte(ch)
			inWord = true
		}
	}
	if quoted {
		return nil, &consoleError{code: "42601", msg: "unterminated quoted identifier", hint: consoleHint}
	}
	endWord()
	if len(words) > 0 {
		stmts = append(stmts, words)
	}
	return stmts, nil
}

func (s *consoleSession) run(ctx context.Context, w []string) *consoleError {
	if err, ok := s.verb(ctx, w); ok { // verbs.go
		return err
	}
	kw := func(i int, want string) bool { return i < len(w) && strings.EqualFold(w[i], want) }
	switch {
	case kw(0, "SHOW") && len(w) == 2:
		ctx, cancel := viewContext(ctx)
		defer cancel()
		switch strings.ToUpper(w[1]) {
		case "SESSIONS":
			s.showSessions(ctx)
		case "ROLES":
			s.showRoles(ctx)
		case "DATABASES":
			s.showDatabases(ctx)
		case "EVICTIONS":
			s.showEvictions(ctx)
		case "INSTANCES":
			return s.showInstances(ctx)
		case "CONFIG":
			return s.showConfig()
		case "STATS":
			s.showStats()
		case "VERSION":
			s.showVersion()
		default:
			return syntaxError()
		}
		return nil
	case kw(0, "KILL") && len(w) == 2:
		return s.kill(ctx, w[1])
	case kw(0, "SET") && kw(1, "LIMIT") && len(w) == 4:
		return s.setLimit(w[2], w[3])
	case kw(0, "SET") && kw(1, "POLICY") && len(w) == 4:
		return s.setPolicy(w[2], w[3], false)
	case kw(0, "SET") && kw(1, "POLICY") && (len(w) == 5 && (kw(4, "dry-run") || kw(4, "dry_run")) ||
		len(w) == 6 && kw(4, "DRY") && kw(5, "RUN")):
		return s.setPolicy(w[2], w[3], true)
	case kw(0, "EXPLAIN") && kw(1, "LOGIN") && len(w) >= 3 && len(w) <= 6:
		return s.explainLogin(ctx, w[2:])
	case kw(0, "RELOAD") && len(w) == 1:
		return s.reload()
	}
	return syntaxError()
}

// Column types.
const (
	oidText = 25
	oidInt4 = 23
	oidInt8 = 20
)

type column struct {
	name string
	oid  uint32
}

// table sends a result: RowDescription, DataRows (nil values are NULL) and
// CommandComplete with tag.
func (s *consoleSession) table(tag string, cols []column, rows [][][]byte) {
	rd := &pgproto3.RowDescription{Fields: make([]pgproto3.FieldDescription, len(cols))}
	for i, c := range cols {
		size := int16(-1)
		switch c.oid {
		case oidInt4:
			size = 4
		case oidInt8:
			size = 8
		}
		rd.Fields[i] = pgproto3.FieldDescription{Name: []byte(c.name), DataTypeOID: c.oid, DataTypeSize: size, TypeModifier: -1}
	}
	s.send(rd)
	for _, r := range rows {
		s.send(&pgproto3.DataRow{Values: r})
	}
	s.send(&pgproto3.CommandComplete{CommandTag: []byte(tag)})
}

func txt(v string) []byte { return []byte(v) }

// txtOrNull is NULL for "".
func txtOrNull(v string) []byte {
	if v == "" {
		return nil
	}
	return []byte(v)
}

func num[T ~int | ~int64 | ~uint32 | ~uint64](v T) []byte {
	return []byte(strconv.FormatInt(int64(v), 10))
}

func boolean(v bool) []byte { return []byte(strconv.FormatBool(v)) }

func ts(t time.Time) []byte {
	if t.IsZero() {
		return nil
	}
	return []byte(t.Format("2006-01-02 15:04:05.000Z07:00"))
}

func pidOrNull(pid uint32) []byte {
	if pid == 0 {
		return nil
	}
	return num(pid)
}

// showInstances lists the rolegate instances on the same server; a peer
// that did not answer has NULLs and its error.
func (s *consoleSession) showInstances(ctx context.Context) *consoleError {
	list, err := s.c.opts.instances(ctx)
	if err != nil {
		return &consoleError{code: "58000", msg: "cannot list the instances: " + err.Error()}
	}
	cols := []column{{"tag", oidText}, {"address", oidText}, {"self", oidText}, {"version", oidText},
		{"started", oidText}, {"registered", oidText}, {"sessions", oidInt8}, {"error", oidText}, {"name", oidText}}
	rows := make([][][]byte, 0, len(list))
	for _, in := range list {
		var sessions, started []byte
		if in.Error == "" {
			sessions, started = num(in.Sessions), ts(in.Started)
		}
		rows = append(rows, [][]byte{txt(in.Tag), txt(in.Address), boolean(in.Self), txtOrNull(in.Version),
			started, ts(in.Registered), sessions, txtOrNull(in.Error), txtOrNull(in.Name)})
	}
	s.table("SHOW", cols, rows)
	return nil
}

func (s *consoleSession) showSessions(ctx context.Context) {
	all, unlisted := listed(s.c.opts.allSessions(ctx, s.c.opts.Proxy.Sessions()))
	if unlisted > 0 {
		s.notice(fmt.Sprintf("%d more connections that have not authenticated yet are not listed (the %d oldest are)",
			unlisted, maxUnverifiedListed))
	}
	// wait is last, so that clients reading the columns by position before
	// it existed read the same values.
	cols := []column{{"pid", oidInt4}, {"role", oidText}, {"database", oidText}, {"application_name", oidText},
		{"client_addr", oidText}, {"state", oidText}, {"started", oidText}, {"idle_since", oidText},
		{"via_rolegate", oidText}, {"bytes_in", oidInt8}, {"bytes_out", oidInt8}, {"wait", oidText}, {"instance", oidText}}
	rows := make([][][]byte, 0, len(all))
	for _, i := range all {
		var in, out []byte // NULL: rolegate does not relay it
		if i.ViaRolegate {
			in, out = num(i.BytesIn), num(i.BytesOut)
		}
		rows = append(rows, [][]byte{pidOrNull(i.PID), txtOrNull(i.Role), txtOrNull(i.Database),
			txt(i.ApplicationName), txt(i.ClientAddr), txtOrNull(i.State), ts(i.Started), ts(i.LastActivity),
			boolean(i.ViaRolegate), in, out, txtOrNull(i.Wait), txtOrNull(i.Instance)})
	}
	s.table("SHOW", cols, rows)
}

// snapshot is the limiter's, or an empty one without limits.
func (s *consoleSession) snapshot() limiter.Snapshot {
	if s.c.opts.Limiter == nil {
		return limiter.Snapshot{}
	}
	return s.c.opts.Limiter()
}

func (s *consoleSession) overrides() map[string]proxy.Override {
	if s.c.opts.Overrides == nil {
		return nil
	}
	return s.c.opts.Overrides()
}

// limitCells are a limit's columns: limit (NULL for none), source, policy.
func limitCells(li limitInfo) [][]byte {
	var lim []byte
	if li.Limit != nil {
		lim = num(*li.Limit)
	}
	return [][]byte{lim, txtOrNull(li.Source), txtOrNull(li.Policy)}
}

func (s *consoleSession) showRoles(ctx context.Context) {
	infos := s.c.opts.Proxy.Sessions()
	views := s.c.opts.roleViews(ctx, infos, s.c.opts.allSessions(ctx, infos))
	ovr := s.overrides()
	cols := []column{{"role", oidText}, {"limit", oidInt4}, {"limit_source", oidText}, {"policy", oidText},
		{"sessions_via_rolegate", oidInt4}, {"sessions_elsewhere", oidInt4}, {"waiting", oidInt4},
		{"admitted", oidInt8}, {"evictions", oidInt8}, {"evict_failures", oidInt8}, {"rejections", oidInt8},
		{"waits", oidInt8}, {"wait_timeouts", oidInt8}, {"override_max_sessions", oidInt4}, {"override_policy", oidText},
		{"override_dry_run", oidText}, {"dry_run_evictions", oidInt8}, {"dry_run_rejections", oidInt8},
		{"dry_run_waits", oidInt8}, {"budget_fallbacks", oidInt8}, {"thrashing", oidText},
		{"paused", oidText}, {"disabled", oidText}}
	rows := make([][][]byte, 0, len(views))
	for _, r := range views {
		t := sum(r.Policies)
		var maxS, pol, dry []byte
		if o, ok := ovr[r.Role]; ok {
			if o.DryRun != nil {
				dry = boolean(*o.DryRun)
			}
			if o.MaxSessions != nil {
				maxS = num(*o.MaxSessions)
			}
			if o.Policy != nil {
				pol = txt(o.Policy.String())
			}
		}
		row := append([][]byte{txt(r.Role)}, limitCells(limitInfo{Limit: r.Limit, Source: r.LimitSource, Policy: r.Policy})...)
		rows = append(rows, append(row, num(r.Sessions), num(r.SessionsElsewhere), num(r.Waiting), num(t.Admitted),
			num(t.Evictions), num(t.EvictFailures), num(t.Rejections), num(t.Waits), num(t.WaitTimeouts), maxS, pol,
			dry, num(t.DryRunEvictions), num(t.DryRunRejections), num(t.DryRunWaits), num(t.BudgetFallbacks),
			txt(thrashCell(r)), boolean(r.Paused), boolean(r.Disabled)))
	}
	s.table("SHOW", cols, rows)
}

// thrashCell is SHOW ROLES' thrashing column: "no", or the clients that
// spent the budget.
func thrashCell(r role) string {
	if !r.Thrashing {
		return "no"
	}
	return "yes: " + strings.Join(r.Evictors, ", ")
}

func (s *consoleSession) showDatabases(ctx context.Context) {
	type dbRow struct{ sessions, elsewhere, waiting int }
	byDB := map[string]*dbRow{}
	get := func(name string) *dbRow {
		r := byDB[name]
		if r == nil {
			r = &dbRow{}
			byDB[name] = r
		}
		return r
	}
	if s.c.opts.ConfiguredDatabases != nil {
		for _, name := range s.c.opts.ConfiguredDatabases() {
			get(name)
		}
	}
	holds := s.c.opts.holds(limiter.ScopeDatabase) // paused or disabled
	for name := range holds {
		get(name)
	}
	for _, i := range s.c.opts.allSessions(ctx, s.c.opts.Proxy.Sessions()) {
		switch {
		case i.Database == "": // an unverified login
		case !i.ViaRolegate:
			get(i.Database).elsewhere++
		case !i.inFlight:
			get(i.Database).sessions++
		case i.State == proxy.StateWaiting.String():
			get(i.Database).waiting++ // this instance's logins in admission
		}
	}
	cols := []column{{"database", oidText}, {"limit", oidInt4}, {"limit_source", oidText}, {"policy", oidText},
		{"sessions_via_rolegate", oidInt4}, {"sessions_elsewhere", oidInt4}, {"waiting", oidInt4},
		{"paused", oidText}, {"disabled", oidText}}
	var rows [][][]byte
	for _, name := range slices.Sorted(maps.Keys(byDB)) {
		r := byDB[name]
		row := append([][]byte{txt(name)}, limitCells(s.c.opts.databaseLimit(ctx, name))...)
		rows = append(rows, append(row, num(r.sessions), num(r.elsewhere), num(r.waiting),
			boolean(holds[name].Paused), boolean(holds[name].Disabled)))
	}
	s.table("SHOW", cols, rows)
}

// showEvictions lists the eviction history, newest first: every
// instance's from the table on the server when rolegate has one, else this
// instance's from memory (proxy.Server.History).
func (s *consoleSession) showEvictions(ctx context.Context) {
	cols := []column{{"time", oidText}, {"instance", oidText}, {"kind", oidText}, {"role", oidText}, {"database", oidText},
		{"client", oidText}, {"victim_pid", oidInt4}, {"victim_role", oidText}, {"victim_client", oidText},
		{"via_rolegate", oidText}, {"policy", oidText}, {"scope", oidText}, {"reason", oidText},
		{"victim_application_name", oidText}, {"victim_age", oidText}, {"victim_idle", oidText}, {"dry_run", oidText}}
	var rows [][][]byte
	for _, e := range s.c.opts.Proxy.History(ctx, EventsShown) { // newest first
		rows = append(rows, [][]byte{ts(e.Time), txtOrNull(e.Instance), txt(e.Kind), txtOrNull(e.Role), txtOrNull(e.Database),
			txtOrNull(e.Client), pidOrNull(e.VictimPID), txtOrNull(e.VictimRole), txtOrNull(e.VictimClient),
			boolean(e.ViaRolegate), txtOrNull(e.Policy), txtOrNull(e.Scope), txtOrNull(e.Reason),
			txtOrNull(e.VictimApplicationName), durationOrNull(e.VictimAge), durationOrNull(e.VictimIdle), boolean(e.DryRun)})
	}
	s.table("SHOW", cols, rows)
}

// durationOrNull is d to the millisecond, or NULL for 0 (unknown).
func durationOrNull(d time.Duration) []byte {
	if d <= 0 {
		return nil
	}
	return txt(d.Round(time.Millisecond).String())
}

func (s *consoleSession) showConfig() *consoleError {
	if s.c.opts.ConfigText == nil {
		return errorf("55000", "the configuration is not available on this console")
	}
	text := strings.TrimRight(s.c.opts.ConfigText(), "\n")
	var rows [][][]byte
	if text != "" {
		for line := range strings.SplitSeq(text, "\n") {
			rows = append(rows, [][]byte{txt(strings.TrimRight(line, "\r"))})
		}
	}
	s.table("SHOW", []column{{"line", oidText}}, rows)
	return nil
}

func (s *consoleSession) showStats() {
	var sessions, waiting int // logged in; in state waiting (logins in flight are not sessions yet)
	var in, out int64
	for _, i := range s.c.opts.Proxy.Sessions() {
		in += i.BytesIn
		out += i.BytesOut
		switch {
		case i.State == proxy.StateWaiting:
			waiting++
		case !i.State.LoggingIn():
			sessions++
		}
	}
	snap := s.snapshot()
	all := make([]counter, 0, len(snap.Counters))
	for k, c := range snap.Counters {
		all = append(all, counterOf(k.Policy, c))
	}
	t := sum(all)
	var tot Totals
	if s.c.opts.Metrics != nil {
		tot = s.c.opts.Metrics.Totals()
	}
	// Bytes of the sessions open now and of those that have ended.
	cols := []column{{"sessions", oidInt4}, {"waiting", oidInt4}, {"logins", oidInt8}, {"login_failures", oidInt8},
		{"bytes_in", oidInt8}, {"bytes_out", oidInt8},
		{"admitted", oidInt8}, {"evictions", oidInt8}, {"evict_failures", oidInt8}, {"rejections", oidInt8},
		{"waits", oidInt8}, {"wait_timeouts", oidInt8}}
	s.table("SHOW", cols, [][][]byte{{num(sessions), num(waiting), num(tot.Logins), num(tot.LoginFailures),
		num(in + tot.BytesIn), num(out + tot.BytesOut), num(t.Admitted),
		num(t.Evictions), num(t.EvictFailures), num(t.Rejections), num(t.Waits), num(t.WaitTimeouts)}})
}

func (s *consoleSession) showVersion() {
	v := s.c.opts.Version
	if v == "" {
		v = "(devel)"
	}
	s.table("SHOW", []column{{"version", oidText}}, [][][]byte{{txt("rolegate " + v)}})
}

func (s *consoleSession) kill(ctx context.Context, arg string) *consoleError {
	pid, err := strconv.ParseUint(arg, 10, 32)
	if err != nil || pid == 0 {
		return errorf("22P02", "invalid pid %q", arg)
	}
	// proxy.Server.Kill writes the log line: pid, who asked, the session.
	ok, err := s.c.opts.Proxy.Kill(ctx, uint32(pid), s.by)
	switch {
	case errors.Is(err, proxy.ErrNoControl):
		return errorf("55000", "%s", err.Error())
	case err != nil:
		return errorf("58000", "%s", err.Error())
	case !ok:
		return errorf("42704", "no session with pid %d", pid)
	}
	s.table("KILL", []column{{"pid", oidInt4}, {"terminated", oidText}}, [][][]byte{{num(pid), boolean(true)}})
	return nil
}

func (s *consoleSession) setLimit(role, arg string) *consoleError {
	if s.c.opts.Override == nil {
		return errorf("55000", "limits are not enabled")
	}
	n, err := strconv.Atoi(arg)
	if err != nil || n < 0 {
		return errorf("22023", "invalid limit %q: want an integer >= 0", arg)
	}
	s.c.opts.Override(role, &n, nil)
	s.c.log.Info("console: role limit overridden until the next reload", "by", s.by, "role", role, "max_sessions", n)
	s.notice(fmt.Sprintf("role %q: max_sessions %d until the next reload", role, n))
	s.send(&pgproto3.CommandComplete{CommandTag: []byte("SET")})
	return nil
}

// setPolicy overrides role's policy until the next reload: in dry run
// (decide and log, act on nothing) or live, which ends a dry run that
// proxy.toml or an earlier SET POLICY ... DRY RUN set.
func (s *consoleSession) setPolicy(role, arg string, dry bool) *consoleError {
	if s.c.opts.Override == nil || s.c.opts.OverrideDryRun == nil {
		return errorf("55000", "limits are not enabled")
	}
	p, err := limiter.ParsePolicy(strings.ToLower(arg))
	if err != nil {
		return errorf("22023", "invalid policy %q: valid policies are reject, wait, newest-wins and evict-idle", arg)
	}
	s.c.opts.Override(role, nil, &p)
	s.c.opts.OverrideDryRun(role, dry)
	mode := "live"
	if dry {
		mode = "dry run"
	}
	s.c.log.Info("console: role policy overridden until the next reload", "by", s.by, "role", role, "policy", p.String(), "dry_run", dry)
	s.notice(fmt.Sprintf("role %q: policy %s (%s) until the next reload", role, p, mode))
	s.send(&pgproto3.CommandComplete{CommandTag: []byte("SET")})
	return nil
}

func (s *consoleSession) reload() *consoleError {
	if s.c.opts.Reload == nil {
		return errorf("55000", "reload is not available on this console")
	}
	// Reload writes the log line, success or failure, with who asked.
	if err := s.c.opts.Reload(s.by); err != nil {
		return errorf("F0000", "reload failed; keeping the previous configuration: %v", err)
	}
	s.send(&pgproto3.CommandComplete{CommandTag: []byte("RELOAD")})
	return nil
}
