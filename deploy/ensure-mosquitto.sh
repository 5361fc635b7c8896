#!/bin/sh
# Make sure a mosquitto binary exists (tests and the demo start their own private broker).
# Installs it with the system package manager when we may (root or password-less sudo);
# otherwise stops with the exact command to run.
set -eu
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || [ -x /usr/local/sbin/mosquitto ]; then
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "mosquitto not found: installing it with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    exit 0
  fi
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    echo "mosquitto not found: installing it with sudo apt-get" >&2
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    exit 0
  fi
  echo "mosquitto is not installed. Run:  sudo apt-get install -y mosquitto" >&2
  exit 1
fi
if command -v brew >/dev/null 2>&1; then
  echo "mosquitto is not installed. Run:  brew install mosquitto" >&2
else
  echo "mosquitto is not installed. Install the 'mosquitto' package of your system." >&2
fi
exit 1
