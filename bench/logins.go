package main

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

const (
	// loginBatch is how many logins per target run between two CPU
	// checks; a batch during which other work used the CPU is run again.
	loginBatch = 50
	// loginWarmup is how many unrecorded logins per target come first.
	loginWarmup = 10
	// loginTimeout bounds one login.
	loginTimeout = 10 * time.Second
)

// loginResult is the login-latency test: every timed login per target, and
// how other work on the machine got in the way.
type loginResult struct {
	took    map[string][]time.Duration
	batches int
	// repeated counts batches run again; skewed, batches kept although
	// other work used the CPU during them (after -repeats repeats).
	repeated, skewed int
}

// loginsInclude says whether t takes part in the login-latency test: every
// target but the extra ones (rolegate-gmp1 and the like) and the TLS ones.
func loginsInclude(t *target) bool { return !t.extra && !t.tls }

// measureLogins times o.logins sequential logins per target with pgx's
// pgconn (SCRAM, sslmode=disable), each from the dial to ReadyForQuery and
// then closed. The targets alternate login by login, in an order that
// rotates, so drift of the machine hits all alike. Before each batch it
// waits for the machine to be quiet, and a batch during which other work
// used more than skewedCores is run again (-repeats).
func measureLogins(ctx context.Context, o options, password string, targets []*target, meter *cpuMeter, r *report) error {
	if o.logins == 0 {
		return nil
	}
	var ts []*target
	var cfgs []*pgconn.Config
	var pids []int
	for _, t := range targets {
		if !loginsInclude(t) {
			if t.pid != 0 {
				pids = append(pids, t.pid) // idle, but its CPU is no "other" work
			}
			continue
		}
		cfg, err := sessionConfig(benchRole, password, benchRole, t.host, t.port)
		if err != nil {
			return fmt.Errorf("login latency: config for %s: %w", t.name, err)
		}
		ts = append(ts, t)
		cfgs = append(cfgs, cfg)
		if t.pid != 0 {
			pids = append(pids, t.pid)
		}
	}
	res := &loginResult{took: make(map[string][]time.Duration)}
	r.logins = res

	logf("login latency: %d unrecorded logins per target", loginWarmup)
	if _, err := loginCycles(ctx, ts, cfgs, 0, loginWarmup); err != nil {
		return err
	}
	for done := 0; done < o.logins; {
		n := min(loginBatch, o.logins-done)
		for attempt := 0; ; attempt++ {
			if err := waitQuiet(ctx, o.quietWait, meter, pids); err != nil {
				return err
			}
			before := meter.take(pids...)
			took, err := loginCycles(ctx, ts, cfgs, done, n)
			if err != nil {
				return err
			}
			meter.settle()
			u := meter.take(pids...).since(before, 0)
			if u.other > skewedCores && attempt < o.repeats {
				logf("login latency: other work used %.2f cores during logins %d–%d; running them again", u.other, done+1, done+n)
				res.repeated++
				continue
			}
			if u.other > skewedCores {
				res.skewed++
			}
			for i, t := range ts {
				res.took[t.name] = append(res.took[t.name], took[i]...)
			}
			res.batches++
			break
		}
		done += n
		logf("login latency: %d/%d logins per target%s", done, o.logins, res.progress(ts))
	}
	return nil
}

// sessionConfig is a pgconn configuration for role on database at
// host:port, with SCRAM and sslmode=disable.
func sessionConfig(role, password, database, host string, port int) (*pgconn.Config, error) {
	u := url.URL{
		Scheme:   "postgres",
		User:     url.UserPassword(role, password),
		Host:     net.JoinHostPort(host, strconv.Itoa(port)),
		Path:     "/" + database,
		RawQuery: url.Values{"sslmode": {"disable"}}.Encode(),
	}
	return pgconn.ParseConfig(u.String())
}

// loginCycles runs n cycles of one login per target, starting with a
// different target each cycle, and returns the times per target.
func loginCycles(ctx context.Context, ts []*target, cfgs []*pgconn.Config, offset, n int) ([][]time.Duration, error) {
	took := make([][]time.Duration, len(ts))
	for c := range n {
		for j := range ts {
			i := (offset + c + j) % len(ts)
			d, err := timeLogin(ctx, cfgs[i])
			if err != nil {
				return nil, fmt.Errorf("login latency: login via %s: %w", ts[i].name, err)
			}
			took[i] = append(took[i], d)
		}
	}
	return took, nil
}

// timeLogin logs in once and returns the time from the dial to
// ReadyForQuery; the connection is then closed (Terminate), untimed.
func timeLogin(ctx context.Context, cfg *pgconn.Config) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, loginTimeout)
	defer cancel()
	start := time.Now()
	conn, err := pgconn.ConnectConfig(ctx, cfg)
	took := time.Since(start)
	if err != nil {
		return 0, err
	}
	if err := conn.Close(ctx); err != nil {
		return 0, fmt.Errorf("close: %w", err)
	}
	return took, nil
}

// progress is the running medians, for the log.
func (res *loginResult) progress(ts []*target) string {
	s := ""
	for _, t := range ts {
		s += fmt.Sprintf("; %s median %s", t.name, fmtMs(res.percentile(t.name, 50)))
	}
	return s
}

// percentile is the p-th percentile (nearest rank) of target's logins.
func (res *loginResult) percentile(target string, p float64) time.Duration {
	return percentile(res.took[target], p)
}

// percentile is the p-th percentile of xs by nearest rank; the median of an
// even count is the mean of the middle two.
func percentile(xs []time.Duration, p float64) time.Duration {
	xs = slices.Clone(xs)
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	if p == 50 && len(xs)%2 == 0 {
		return (xs[len(xs)/2-1] + xs[len(xs)/2]) / 2
	}
	rank := int(math.Ceil(p / 100 * float64(len(xs))))
	return xs[min(max(rank, 1), len(xs))-1]
}

// fmtMs prints a duration in milliseconds with two decimals.
func fmtMs(d time.Duration) string {
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

// fmtAddedMs prints a difference in milliseconds with its sign.
func fmtAddedMs(d time.Duration) string {
	return fmt.Sprintf("%+.2f ms", float64(d)/float64(time.Millisecond))
}
