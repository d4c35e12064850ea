package auth

import (
	"context"
	"testing"
	"time"
)

// countingSource answers every role with the current secret and counts queries.
type countingSource struct {
	calls  int
	secret string
}

func (c *countingSource) Secret(_ context.Context, role string) (Secret, bool, error) {
	c.calls++
	if role == "nobody" {
		return Secret{}, false, nil
	}
	return Secret{Kind: Plain, Plain: c.secret}, true, nil
}

func TestStoreCachesAndSpacesRefreshes(t *testing.T) {
	ctx := context.Background()
	src := &countingSource{secret: "one"}
	now := time.Unix(1000, 0)
	s := NewStore(10, time.Minute, src)
	s.now = func() time.Time { return now }

	lookup := func(role, want string, wantCalls int) {
		t.Helper()
		sec, _, err := s.Lookup(ctx, role)
		if err != nil || sec.Plain != want || src.calls != wantCalls {
			t.Fatalf("Lookup(%q) = %q, %v after %d queries; want %q after %d", role, sec.Plain, err, src.calls, want, wantCalls)
		}
	}
	refresh := func(want string, wantCalls int) {
		t.Helper()
		sec, _, err := s.Refresh(ctx, "r")
		if err != nil || sec.Plain != want || src.calls != wantCalls {
			t.Fatalf("Refresh = %q, %v after %d queries; want %q after %d", sec.Plain, err, src.calls, want, wantCalls)
		}
	}
	lookup("r", "one", 1)
	lookup("r", "one", 1) // cached
	src.secret = "two"    // the password changes on the server
	refresh("two", 2)     // the first failure after a lookup always asks
	lookup("r", "two", 2)
	refresh("two", 2) // another failure within a second: no query
	refresh("two", 2)
	now = now.Add(minRefresh)
	refresh("two", 3)
	now = now.Add(time.Minute) // expired
	lookup("r", "two", 4)
	lookup("nobody", "", 5) // unknown roles are cached too
	lookup("nobody", "", 5)
	s.Forget("r")
	lookup("r", "two", 6)
}

func TestStoreWithoutCache(t *testing.T) {
	src := &countingSource{secret: "x"}
	s := NewStore(10, 0, src)
	for i := 1; i <= 3; i++ {
		if _, _, err := s.Lookup(context.Background(), "r"); err != nil || src.calls != i {
			t.Fatalf("lookup %d: %v, %d queries", i, err, src.calls)
		}
	}
	if _, _, err := s.Refresh(context.Background(), "r"); err != nil || src.calls != 4 {
		t.Fatalf("refresh: %v, %d queries", err, src.calls)
	}
}

func TestStoreIterationsFromVerifiers(t *testing.T) {
	ctx := context.Background()
	v := NewSCRAMVerifier("pw", []byte("0123456789abcdef"), 10000)
	src := SourceFunc(func(_ context.Context, role string) (Secret, bool, error) {
		switch role {
		case "scram":
			return Secret{Kind: SCRAM, SCRAM: v}, true, nil
		case "md5":
			return Secret{Kind: MD5, MD5: MD5Hash("md5", "pw")}, true, nil
		}
		return Secret{}, false, nil
	})
	s := NewStore(10, time.Minute, src)
	if got := s.Iterations(); got != 0 {
		t.Fatalf("Iterations before any verifier = %d, want 0", got)
	}
	for _, role := range []string{"md5", "nobody"} {
		if _, _, err := s.Lookup(ctx, role); err != nil {
			t.Fatal(err)
		}
	}
	if got := s.Iterations(); got != 0 {
		t.Fatalf("Iterations after md5 and unknown roles = %d, want 0", got)
	}
	if _, _, err := s.Lookup(ctx, "scram"); err != nil {
		t.Fatal(err)
	}
	if got := s.Iterations(); got != 10000 {
		t.Fatalf("Iterations = %d, want the verifier's 10000", got)
	}
}
