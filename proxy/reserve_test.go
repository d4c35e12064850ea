package proxy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/rolegate/rolegate/auth"
	"github.com/rolegate/rolegate/limiter"
	"github.com/rolegate/rolegate/upstream"
)

// panicView is the control connection as admission's ServerView (its
// advisory locks and reservations too), whose Census or Reserve panics as
// many times as armed.
type panicView struct {
	*upstream.Control
	census, reserve atomic.Int32
}

func (v *panicView) Census(ctx context.Context, role, database string) ([]limiter.Holder, error) {
	if v.census.Add(-1) >= 0 {
		panic("test: census panics")
	}
	return v.Control.Census(ctx, role, database)
}

func (v *panicView) Reserve(ctx context.Context, role, database string) (func(), error) {
	if v.reserve.Add(-1) >= 0 {
		panic("test: reserve panics")
	}
	return v.Control.Reserve(ctx, role, database)
}

// localView hides the server's locks and reservations: admission then uses
// the limiter's in-process lock and reservations only.
type localView struct{ v ServerView }

func (l localView) Census(ctx context.Context, role, database string) ([]limiter.Holder, error) {
	return l.v.Census(ctx, role, database)
}

func (l localView) ServerLimits(ctx context.Context, role, database string, ttl time.Duration) (int, bool, int, error) {
	return l.v.ServerLimits(ctx, role, database, ttl)
}

func (l localView) Terminate(ctx context.Context, t upstream.Target, timeout time.Duration) (upstream.Termination, error) {
	return l.v.Terminate(ctx, t, timeout)
}

func (l localView) Present(ctx context.Context, t upstream.Target) (bool, error) {
	return l.v.Present(ctx, t)
}

// viewProxy is a proxy-mode proxy whose limits read the server through view,
// with rule for role.
func viewProxy(t *testing.T, ctl *upstream.Control, view ServerView, role string, rule limiter.Rule, adjust func(*Config)) *testProxy {
	t.Helper()
	lim := &Limits{Limiter: limiter.New(time.Now), Server: view}
	lim.SetRules(mapRules{roles: map[string]limiter.Rule{role: rule}}, true, 0)
	return startProxyWith(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret)), limits: lim}, adjust)
}

// roleLocks counts what rolegate holds on the server for role: its
// admission lock (two-int advisory lock, class "role") and its reservations
// (one-bigint advisory locks with the role's hash in classid).
func roleLocks(t *testing.T, su *pgx.Conn, role string) (locks, reservations int) {
	t.Helper()
	err := su.QueryRow(context.Background(), `select
		count(*) filter (where objsubid = 2 and classid::int8 = x'726f6c65'::int8 and objid::int8 = (hashtext($1)::int8 & 4294967295)),
		count(*) filter (where objsubid = 1 and classid::int8 = (hashtext($1)::int8 & 4294967295) and objid::int8 < 2147483648)
		from pg_locks where locktype = 'advisory'`, role).Scan(&locks, &reservations)
	if err != nil {
		t.Fatal(err)
	}
	return locks, reservations
}

// A panic while a login is being admitted (in the census, under the locks,
// or while reserving its slot) ends that session only: every lock and slot
// it held is released, so the next login of the role is admitted, and
// nothing of it is left in pg_locks.
func TestAdmissionPanicReleasesLocks(t *testing.T) {
	t.Parallel()
	su := connect(t, shared.SuperDSN())
	for i, tc := range []struct {
		name    string
		local   bool // in-process locks and reservations only
		reserve bool // Reserve panics, not Census
	}{
		{name: "census with server locks"},
		{name: "census with in-process locks", local: true},
		{name: "reserve", reserve: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			role := fmt.Sprintf("res_panic_%d", i)
			pw := newRole(t, role, -1)
			ctl := superControl(t, shared)
			pv := &panicView{Control: ctl}
			var view ServerView = pv
			if tc.local {
				view = localView{pv}
			}
			p := viewProxy(t, ctl, view, role, limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyReject}, nil)
			if tc.reserve {
				pv.reserve.Store(1)
			} else {
				pv.census.Store(1)
			}
			if c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil); err == nil {
				c.Close(context.Background())
				t.Fatal("the login whose admission panicked got in")
			}
			waitUntil(t, 30*time.Second, "the panic log line", func() bool { return len(logLines(p, "session panicked")) == 1 })
			// Not wedged: the next login is admitted, the slot being free.
			c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
			if err != nil {
				t.Fatalf("the next login: %v", err)
			}
			defer c.Close(context.Background())
			wantAlive(t, c, "the next login")
			if !tc.local {
				waitUntil(t, 30*time.Second, "no lock or reservation of the role in pg_locks", func() bool {
					l, r := roleLocks(t, su, role)
					return l == 0 && r == 0
				})
			}
		})
	}
}

// A panic after admission, in the server login (a Server without an upstream
// dialer panics there), frees the reserved slot: the next login is admitted
// too, and panics the same way, instead of being refused at the limit.
func TestAdmittedLoginPanicFreesSlot(t *testing.T) {
	t.Parallel()
	const role = "res_panic_login"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	su := connect(t, shared.SuperDSN())
	p := viewProxy(t, ctl, ctl, role, limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyReject},
		func(c *Config) { c.Upstream = nil })
	for i := range 2 {
		if c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil); err == nil {
			c.Close(context.Background())
			t.Fatalf("login %d got in without an upstream", i)
		} else if sqlstate(err) == "53300" {
			t.Fatalf("login %d refused at the limit: the panicked login kept its slot", i)
		}
		waitUntil(t, 30*time.Second, "the panic log line", func() bool { return len(logLines(p, "session panicked")) == i+1 })
	}
	if l := logLines(p, "msg=rejected"); len(l) != 0 {
		t.Errorf("rejections: %q", l)
	}
	waitUntil(t, 30*time.Second, "no reservation of the role in pg_locks", func() bool {
		_, r := roleLocks(t, su, role)
		return r == 0
	})
}

// A login admitted into a reserved slot whose server login fails (here the
// database does not exist: the server's 3D000, passed on as the server sent
// it) releases the slot: nothing is left in pg_locks and the next login gets
// the role's only slot.
func TestReservationReleasedOnFailedLogin(t *testing.T) {
	t.Parallel()
	const role = "res_failed"
	pw := newRole(t, role, -1)
	ctl := superControl(t, shared)
	su := connect(t, shared.SuperDSN())
	p := viewProxy(t, ctl, ctl, role, limiter.Rule{MaxSessions: 1, Policy: limiter.PolicyReject}, nil)

	_, direct := tryConnect(shared.DSN(role, pw, "no_such_db"), 30*time.Second, nil)
	for i := range 3 { // more logins than slots: each failure frees its slot
		_, err := tryConnect(p.DSN(role, pw, "no_such_db"), 30*time.Second, nil)
		var got, want *pgconn.PgError
		if !errors.As(err, &got) || !errors.As(direct, &want) || got.Code != "3D000" || got.Code != want.Code || got.Message != want.Message {
			t.Fatalf("login %d to a missing database: %v; the server says %v", i, err, direct)
		}
	}
	waitUntil(t, 30*time.Second, "no reservation of the role in pg_locks", func() bool {
		_, r := roleLocks(t, su, role)
		return r == 0
	})
	c, err := tryConnect(p.DSN(role, pw, "app"), 30*time.Second, nil)
	if err != nil {
		t.Fatalf("login after the failures: %v", err)
	}
	defer c.Close(context.Background())
	wantAlive(t, c, "the login after the failures")
}

// A storm of logins for a role with limit 5 under reject, through one rolegate
// or through two instances (two Servers with their own control pools and
// limiters, on the same server): every login is answered, admitted or
// refused with 53300, and the server never holds more sessions of the role
// than the limit. The first five admitted hold their sessions until a login
// has been refused, so both outcomes occur however fast the machine is.
func TestLimitStormReject(t *testing.T) {
	t.Parallel()
	const (
		logins  = 200
		workers = 6
		limit   = 5
	)
	for _, instances := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d instances", instances), func(t *testing.T) {
			t.Parallel()
			role := fmt.Sprintf("res_storm_%d", instances)
			pw := newRole(t, role, -1) // only rolegate enforces the limit
			var proxies []*testProxy
			for range instances {
				ctl := superControl(t, shared)
				proxies = append(proxies, viewProxy(t, ctl, ctl, role,
					limiter.Rule{MaxSessions: limit, Policy: limiter.PolicyReject}, nil))
			}
			stop := sampleSessions(t, role)
			var (
				next, admitted, refused atomic.Int64
				firstRefusal            = make(chan struct{})
				once                    sync.Once
				mu                      sync.Mutex
				odd                     []error
				wg                      sync.WaitGroup
			)
			for range workers {
				wg.Go(func() {
					for {
						i := next.Add(1) - 1
						if i >= logins {
							return
						}
						p := proxies[int(i)%len(proxies)]
						c, err := tryConnect(p.DSN(role, pw, "app"), 2*time.Minute, nil)
						if err != nil {
							var pe *pgconn.PgError
							if errors.As(err, &pe) && pe.Code == "53300" && pe.Message == `too many connections for role "`+role+`"` {
								refused.Add(1)
								once.Do(func() { close(firstRefusal) })
							} else {
								mu.Lock()
								odd = append(odd, err)
								mu.Unlock()
							}
							continue
						}
						admitted.Add(1)
						select {
						case <-firstRefusal:
						case <-time.After(time.Minute):
						}
						ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
						if _, err := c.Exec(ctx, "select pg_sleep(0.01)"); err != nil {
							mu.Lock()
							odd = append(odd, fmt.Errorf("admitted session: %w", err))
							mu.Unlock()
						}
						cancel()
						c.Close(context.Background())
					}
				})
			}
			wg.Wait()
			most, samples := stop()
			t.Logf("%d admitted, %d refused; at most %d sessions in %d samples", admitted.Load(), refused.Load(), most, samples)
			for _, err := range odd {
				t.Errorf("a login neither admitted nor refused with 53300: %v", err)
			}
			if admitted.Load()+refused.Load() != logins {
				t.Errorf("%d admitted + %d refused, want %d answers", admitted.Load(), refused.Load(), logins)
			}
			if admitted.Load() < limit || refused.Load() == 0 {
				t.Errorf("%d admitted and %d refused: want at least %d and 1", admitted.Load(), refused.Load(), limit)
			}
			if most > limit {
				t.Errorf("at most %d sessions of %s seen at once, limit %d", most, role, limit)
			}
			su := connect(t, shared.SuperDSN())
			waitUntil(t, 30*time.Second, "no lock or reservation of the role left in pg_locks", func() bool {
				l, r := roleLocks(t, su, role)
				return l == 0 && r == 0
			})
			for _, p := range proxies {
				if l := admissionWarnings(p); len(l) != 0 {
					t.Errorf("warnings: %q", l)
				}
			}
		})
	}
}
