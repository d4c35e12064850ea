package proxy

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/rolegate/rolegate/auth"
)

func TestProxyAuthSmoke(t *testing.T) {
	ctl := superControl(t, shared)
	p := startProxy(t, proxyOpts{auth: proxyAuth(time.Minute, auth.SourceFunc(ctl.Secret))})
	for _, u := range []struct{ user, pw string }{{"md5_user", md5PW}, {"scram_user", scramPW}} {
		c := connect(t, p.DSN(u.user, u.pw, "app"))
		var who string
		if err := c.QueryRow(context.Background(), "select current_user").Scan(&who); err != nil || who != u.user {
			t.Fatalf("%s: got %q, %v", u.user, who, err)
		}
		out, errs, err := psql(t, p.DSN(u.user, u.pw, "app"), "", "-Atc", "select current_user")
		if err != nil || strings.TrimSpace(out) != u.user {
			t.Fatalf("psql %s: %q %q %v", u.user, out, errs, err)
		}
		_, errs, err = psql(t, p.DSN(u.user, "wrong", "app"), "", "-Atc", "select current_user")
		if err == nil || !strings.Contains(errs, `password authentication failed for user "`+u.user+`"`) {
			t.Fatalf("psql wrong pw %s: %q %v", u.user, errs, err)
		}
	}
	_, errs, err := psql(t, p.DSN("nobody_here", "x", "app"), "", "-Atc", "select 1")
	if err == nil || !strings.Contains(errs, `password authentication failed for user "nobody_here"`) {
		t.Fatalf("unknown: %q %v", errs, err)
	}
}
