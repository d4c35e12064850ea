#!/usr/bin/env bash
# Makes sure Chromium is installed for the admin live page's browser test
# (admin TestLivePage, driven with chromedp). As root it installs Debian's
# chromium package; otherwise it says what to install. The test fails, with a
# message, when Chromium is missing: it never skips.
set -euo pipefail
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "chromium not found: installing Debian's chromium package for the browser test" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q --no-install-recommends chromium >&2
  exit 0
fi
cat >&2 <<'MSG'
The admin live page's browser test needs Chromium at /usr/bin/chromium:
  Debian/Ubuntu:  sudo apt-get install chromium
Without it, `make test` fails in admin TestLivePage.
MSG
exit 1
