package pgtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ServerBinDir returns the directory holding the PostgreSQL server binaries
// (initdb and postgres). It looks, in order, at $PG_BINDIR, at `pg_config
// --bindir`, at the newest /usr/lib/postgresql/*/bin (Debian and Ubuntu keep
// the server off PATH), and at the directory of initdb on PATH. pg_config may
// come from libpq-dev without a server next to it, so every candidate must
// actually contain both binaries.
func ServerBinDir() (string, error) {
	var tried []string
	if dir := os.Getenv("PG_BINDIR"); dir != "" {
		if hasServerBinaries(dir) {
			return dir, nil
		}
		// An explicit choice that does not work must not be silently replaced.
		return "", fmt.Errorf("PG_BINDIR=%s holds no initdb and postgres binaries", dir)
	}
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dir := strings.TrimSpace(string(out))
		if hasServerBinaries(dir) {
			return dir, nil
		}
		tried = append(tried, dir+" (from pg_config)")
	}
	if dir := newestDebianBinDir(); dir != "" {
		return dir, nil
	}
	tried = append(tried, "/usr/lib/postgresql/*/bin")
	if path, err := exec.LookPath("initdb"); err == nil {
		// initdb on PATH is often a symlink (/usr/local/bin/initdb); the
		// real directory is where postgres lives too.
		if real, err := filepath.EvalSymlinks(path); err == nil {
			path = real
		}
		if dir := filepath.Dir(path); hasServerBinaries(dir) {
			return dir, nil
		}
	}
	tried = append(tried, "initdb on PATH")
	return "", errors.New("PostgreSQL server binaries (initdb, postgres) not found; tried " +
		strings.Join(tried, ", ") +
		"; install them (Debian/Ubuntu: apt-get install postgresql) or set PG_BINDIR")
}

func hasServerBinaries(dir string) bool {
	for _, name := range []string{"initdb", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil || fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return false
		}
	}
	return true
}

// newestDebianBinDir picks the highest major version, compared as numbers so
// that 9.6 sorts below 10.
func newestDebianBinDir() string {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	version := func(dir string) []int {
		var v []int
		for _, part := range strings.Split(filepath.Base(filepath.Dir(dir)), ".") {
			n, err := strconv.Atoi(part)
			if err != nil {
				return nil
			}
			v = append(v, n)
		}
		return v
	}
	slices.SortFunc(dirs, func(a, b string) int { return slices.Compare(version(b), version(a)) })
	for _, dir := range dirs {
		if hasServerBinaries(dir) {
			return dir
		}
	}
	return ""
}
