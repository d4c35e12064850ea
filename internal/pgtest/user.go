package pgtest

import (
	"errors"
	"fmt"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"
)

// ServerCredential returns the identity to run initdb and postgres (or any
// other server that refuses root, such as PgBouncer) as, or nil to run them as
// ourselves. PostgreSQL refuses to run as root, and CI runs tests as root, so
// root hands the server to an unprivileged user instead of asking for sudo.
func ServerCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err := strconv.ParseUint(u.Uid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("user %s: uid %q: %w", name, u.Uid, err)
		}
		gid, err := strconv.ParseUint(u.Gid, 10, 32)
		if err != nil {
			return nil, fmt.Errorf("user %s: gid %q: %w", name, u.Gid, err)
		}
		// An empty Groups list drops root's supplementary groups, which
		// would otherwise leak into the server process.
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
	}
	return nil, errors.New("running as root, PostgreSQL refuses root, and there is neither a postgres nor a nobody user to run it as; " +
		"create one (useradd --system postgres) or run the tests as a normal user")
}

// chown hands path to the server user when we run the server as someone else.
func chown(cred *syscall.Credential, path string) error {
	if cred == nil {
		return nil
	}
	if err := os.Chown(path, int(cred.Uid), int(cred.Gid)); err != nil {
		return fmt.Errorf("chown %s to the server user: %w", path, err)
	}
	return nil
}

// CleanEnv is our environment without PG* variables, which could redirect a
// PostgreSQL program, and without locale variables, plus LC_ALL=C, so that
// programs whose output is read (the server's log, pgbench) speak English.
func CleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "PG") || strings.HasPrefix(name, "LC_") || name == "LANG" || name == "LANGUAGE" {
			continue
		}
		env = append(env, kv)
	}
	return append(env, "LC_ALL=C")
}
