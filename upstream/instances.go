package upstream

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/rolegate/rolegate/config"
)

// Instances: rolegate instances that front the same server find each other
// through it. Each names its listening connection (the one ListenSlots
// holds for good) "rolegate <tag> <advertise>" in application_name: the
// registration lasts exactly as long as the instance's connection, so a
// crashed instance's entry disappears with it, and needs no table. The tag
// is one byte, which every cancel key the instance issues carries, so that
// another instance can tell whose key a CancelRequest holds.

// instancePrefix starts every registration's application_name.
const instancePrefix = "rolegate "

// A registration's application_name keeps 63 bytes: the prefix and the tag
// take 12, which leaves config.MaxAdvertise for the address.
var _ = [1]struct{}{}[63-len(instancePrefix)-3-config.MaxAdvertise]

// Instance is one live rolegate instance on the server.
type Instance struct {
	Tag       byte
	Advertise string    // host:port where it takes CancelRequests and peer requests
	Since     time.Time // when its listening connection opened: about when it started serving
	PID       uint32    // its listening connection's backend
	Self      bool      // this instance
}

// instanceName is the application_name of a registration.
func instanceName(tag byte, advertise string) string {
	return fmt.Sprintf("%s%02x %s", instancePrefix, tag, advertise)
}

// parseInstanceName reads a registration's application_name.
func parseInstanceName(name string) (tag byte, advertise string, ok bool) {
	rest, ok := strings.CutPrefix(name, instancePrefix)
	if !ok {
		return 0, "", false
	}
	hexTag, advertise, ok := strings.Cut(rest, " ")
	if !ok || len(hexTag) != 2 || advertise == "" {
		return 0, "", false
	}
	n, err := strconv.ParseUint(hexTag, 16, 8)
	if err != nil {
		return 0, "", false
	}
	return byte(n), advertise, true
}

// SetInstance sets what this instance registers as (its tag and the address
// other instances reach it at); ListenSlots registers it with its next
// connection. Call it before ListenSlots.
func (c *Control) SetInstance(tag byte, advertise string) {
	c.signals.mu.Lock()
	defer c.signals.mu.Unlock()
	c.signals.tag, c.signals.advertise, c.signals.registered = tag, advertise, true
}

// Instances lists the live instances registered on the server, oldest
// first. Only registrations the control role can see count: every
// instance must use the same control role (or one with pg_read_all_stats).
func (c *Control) Instances(ctx context.Context) ([]Instance, error) {
	rows, err := c.pool.Query(ctx, `SELECT pid, application_name, backend_start FROM pg_catalog.pg_stat_activity
WHERE application_name LIKE 'rolegate %' AND backend_type = 'client backend' ORDER BY backend_start, pid`)
	if err != nil {
		return nil, fmt.Errorf("list instances: %w", err)
	}
	defer rows.Close()
	c.signals.mu.Lock()
	own := c.signals.listenPID
	c.signals.mu.Unlock()
	var out []Instance
	for rows.Next() {
		var pid int32
		var name string
		var since time.Time
		if err := rows.Scan(&pid, &name, &since); err != nil {
			return nil, fmt.Errorf("list instances: %w", err)
		}
		tag, adv, ok := parseInstanceName(name)
		if !ok {
			continue
		}
		out = append(out, Instance{Tag: tag, Advertise: adv, Since: since, PID: uint32(pid), Self: own != 0 && uint32(pid) == own})
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list instances: %w", err)
	}
	return out, nil
}
