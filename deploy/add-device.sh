#!/bin/sh
# Add (or update) MQTT credentials for an EchoKit device, or for the bridge, in Mosquitto's
# password file, and print the settings the device's firmware needs.
#
# Usage:
#   deploy/add-device.sh [options] DEVICE_ID [PASSWORD]   add or update a device (user = device id)
#   deploy/add-device.sh [options] --bridge [PASSWORD]    add or update the bridge's user "bridge"
#   deploy/add-device.sh [options] --remove DEVICE_ID     delete a device's credentials
#
#   DEVICE_ID   [A-Za-z0-9_-]{1,64}; EchoKit devices use their Wi-Fi MAC as 12 lower-case hex
#               digits (aabbccddeeff). "bridge" is reserved for the bridge.
#   PASSWORD    optional: default $DEVICE_PASSWORD, else a random one (printed once: note it).
#               For --bridge the default is $MQTT_PASSWORD, else MQTT_PASSWORD from deploy/.env
#               (or $ENV_FILE), so the broker and the bridge container agree.
#
# Options:
#   -f FILE           password file (default: $PASSWORD_FILE, else deploy/mosquitto/passwd, the
#                     file docker-compose.yml mounts). Created when missing.
#   --compose         write into the RUNNING compose broker instead (docker compose exec
#                     mosquitto mosquitto_passwd ...) and reload it; use this once the stack has
#                     started, because the image then owns the mounted file (uid 1883).
#   --prefix PREFIX   topic prefix to print (the bridge's mqtt.topic_prefix; default echokit).
#                     The ACL (deploy/mosquitto/acl) hard-codes "echokit": edit it to match.
#   --broker HOST     host name or address the devices use, for the printed broker URI.
#   -h, --help        this text.
#
# Without Docker it needs mosquitto_passwd (Debian/Ubuntu: apt-get install mosquitto; macOS: brew
# install mosquitto). If only Docker is there, it runs mosquitto_passwd from eclipse-mosquitto:2.
# Set MOSQUITTO_PASSWD to use another command.
#
# A running Mosquitto does not notice a changed password file: reload it (nobody is disconnected)
#   docker compose -f deploy/docker-compose.yml kill -s SIGHUP mosquitto     (compose)
#   sudo systemctl reload mosquitto                                          (Debian package)
#
# The same by hand, inside the running compose broker:
#   docker compose -f deploy/docker-compose.yml exec mosquitto \
#       mosquitto_passwd -b /mosquitto/config/passwd aabbccddeeff 'the-password'
#   docker compose -f deploy/docker-compose.yml kill -s SIGHUP mosquitto
#
# Examples:
#   deploy/add-device.sh --bridge                       # once; uses MQTT_PASSWORD from deploy/.env
#   deploy/add-device.sh aabbccddeeff                   # random password, printed
#   deploy/add-device.sh --compose --broker 192.168.1.10 kitchen 's3cret-pass'
set -eu
LC_ALL=C
export LC_ALL

DEPLOY_DIR=$(cd "$(dirname "$0")" && pwd)
BRIDGE_USER=bridge
COMPOSE_FILE="$DEPLOY_DIR/docker-compose.yml"
CONTAINER_PASSWD=/mosquitto/config/passwd
ENV_FILE=${ENV_FILE:-$DEPLOY_DIR/.env}

usage() {
  sed -n '2,/^set -eu$/p' "$0" | sed -e '/^set -eu$/d' -e 's/^# \{0,1\}//'
}

die() {
  echo "add-device.sh: $*" >&2
  exit 2
}

valid_id() {
  # [A-Za-z0-9_-]{1,64}, as PROTOCOL.md §2 (LC_ALL=C keeps the ranges ASCII).
  case $1 in
    '' | *[!A-Za-z0-9_-]*) return 1 ;;
  esac
  [ "${#1}" -le 64 ]
}

random_password() {
  # 24 characters from [A-Za-z0-9]: about 143 bits.
  LC_ALL=C tr -dc 'A-Za-z0-9' </dev/urandom | head -c 24
}

password_from_env_file() {
  # MQTT_PASSWORD=... from deploy/.env (the line as docker compose reads it; quotes removed).
  [ -f "$ENV_FILE" ] || return 0
  sed -n 's/^[[:space:]]*MQTT_PASSWORD[[:space:]]*=[[:space:]]*//p' "$ENV_FILE" | tail -n 1 |
    sed -e 's/^"\(.*\)"[[:space:]]*$/\1/' -e "s/^'\\(.*\\)'[[:space:]]*\$/\\1/"
}

mosquitto_passwd_cmd() {
  # Echo how to run mosquitto_passwd on this machine, or fail.
  if [ -n "${MOSQUITTO_PASSWD:-}" ]; then
    echo "$MOSQUITTO_PASSWD"
    return 0
  fi
  for candidate in mosquitto_passwd /usr/bin/mosquitto_passwd /usr/sbin/mosquitto_passwd /usr/local/bin/mosquitto_passwd; do
    if command -v "$candidate" >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  if command -v docker >/dev/null 2>&1; then
    echo docker
    return 0
  fi
  return 1
}

run_passwd() {
  # run_passwd ARGS... ; the last file argument is $PASSWD_FILE, on the host.
  if [ "$PASSWD_CMD" = docker ]; then
    dir=$(cd "$(dirname "$PASSWD_FILE")" && pwd)
    name=$(basename "$PASSWD_FILE")
    # As the calling user, so the file stays theirs; the image's entrypoint only chowns as root.
    docker run --rm --user "$(id -u):$(id -g)" -v "$dir:/work" -w /work eclipse-mosquitto:2 \
      mosquitto_passwd "$@" | sed "s#/work/$name#$PASSWD_FILE#g"
  else
    # shellcheck disable=SC2086 # MOSQUITTO_PASSWD may carry arguments
    $PASSWD_CMD "$@"
  fi
}

passwd_file_arg() {
  # The file name as mosquitto_passwd sees it.
  if [ "$PASSWD_CMD" = docker ]; then basename "$PASSWD_FILE"; else echo "$PASSWD_FILE"; fi
}

compose() {
  docker compose -f "$COMPOSE_FILE" "$@"
}

# ---- arguments -------------------------------------------------------------------------------
PASSWD_FILE=${PASSWORD_FILE:-$DEPLOY_DIR/mosquitto/passwd}
MODE=device
USE_COMPOSE=false
PREFIX=echokit
BROKER_HOST="<broker-host>"
NARGS=0
ARG1=
ARG2=
add_arg() {
  NARGS=$((NARGS + 1))
  case $NARGS in
    1) ARG1=$1 ;;
    2) ARG2=$1 ;;
  esac
}
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    -f) [ $# -ge 2 ] || die "-f needs a file"; PASSWD_FILE=$2; shift 2 ;;
    --bridge) MODE=bridge; shift ;;
    --remove) MODE=remove; shift ;;
    --compose) USE_COMPOSE=true; shift ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
    --broker) [ $# -ge 2 ] || die "--broker needs a host"; BROKER_HOST=$2; shift 2 ;;
    --) shift; for arg in "$@"; do add_arg "$arg"; done; break ;;
    -?*) die "unknown option $1 (see --help)" ;;
    *) add_arg "$1"; shift ;;
  esac
done

case $PREFIX in
  '' | /* | */ | *//* | *[!A-Za-z0-9_/-]*) die "invalid --prefix '$PREFIX' (levels of [A-Za-z0-9_-] separated by /)" ;;
esac

case $MODE in
  bridge)
    [ "$NARGS" -le 1 ] || die "--bridge takes at most a password (see --help)"
    USER_NAME=$BRIDGE_USER
    PASSWORD=${ARG1:-${MQTT_PASSWORD:-}}
    [ -n "$PASSWORD" ] || PASSWORD=$(password_from_env_file)
    [ "$PASSWORD" != change-me ] || die "MQTT_PASSWORD is still .env.example's 'change-me': set a real one in $ENV_FILE"
    ;;
  device)
    [ "$NARGS" -ge 1 ] && [ "$NARGS" -le 2 ] || { usage >&2; exit 2; }
    USER_NAME=$ARG1
    valid_id "$USER_NAME" || die "invalid device id '$USER_NAME': use 1 to 64 of [A-Za-z0-9_-] (EchoKit: the MAC as 12 lower-case hex digits, no ':')"
    [ "$USER_NAME" != "$BRIDGE_USER" ] || die "'$BRIDGE_USER' is the bridge's user name; use --bridge for it"
    PASSWORD=${ARG2:-${DEVICE_PASSWORD:-}}
    ;;
  remove)
    [ "$NARGS" -eq 1 ] || die "--remove takes one device id"
    USER_NAME=$ARG1
    valid_id "$USER_NAME" || die "invalid device id '$USER_NAME'"
    PASSWORD=
    ;;
esac

GENERATED=false
if [ "$MODE" != remove ] && [ -z "$PASSWORD" ]; then
  PASSWORD=$(random_password)
  GENERATED=true
fi
case $PASSWORD in
  *'
'*) die "the password must be one line" ;;
esac

# ---- write -----------------------------------------------------------------------------------
if [ "$USE_COMPOSE" = true ]; then
  command -v docker >/dev/null 2>&1 || die "--compose needs docker"
  if [ "$MODE" = remove ]; then
    compose exec -T mosquitto mosquitto_passwd -D "$CONTAINER_PASSWD" "$USER_NAME"
  else
    # -c only when the file is missing: it would wipe every other user.
    compose exec -T mosquitto sh -c '
      if [ -e "$1" ]; then exec mosquitto_passwd -b "$1" "$2" "$3"; else exec mosquitto_passwd -c -b "$1" "$2" "$3"; fi
    ' sh "$CONTAINER_PASSWD" "$USER_NAME" "$PASSWORD"
  fi
  compose kill -s SIGHUP mosquitto >/dev/null
  WHERE="the compose broker's $CONTAINER_PASSWD (reloaded)"
else
  PASSWD_CMD=$(mosquitto_passwd_cmd) ||
    die "mosquitto_passwd not found: install it (Debian/Ubuntu: sudo apt-get install -y mosquitto; macOS: brew install mosquitto), or use --compose with a running stack"
  mkdir -p "$(dirname "$PASSWD_FILE")"
  if [ -e "$PASSWD_FILE" ] && [ ! -w "$PASSWD_FILE" ]; then
    die "$PASSWD_FILE is not writable by $(id -un). After 'docker compose up' the broker image owns it (uid 1883): use --compose, or run this with sudo"
  fi
  FILE_ARG=$(passwd_file_arg)
  if [ "$MODE" = remove ]; then
    [ -e "$PASSWD_FILE" ] || die "$PASSWD_FILE does not exist"
    run_passwd -D "$FILE_ARG" "$USER_NAME"
  elif [ -e "$PASSWD_FILE" ]; then
    run_passwd -b "$FILE_ARG" "$USER_NAME" "$PASSWORD"
  else
    # Mosquitto drops root privileges before reading this file: keep it readable by the
    # broker's user (mosquitto_passwd creates it with the umask's mode).
    (umask 022 && run_passwd -c -b "$FILE_ARG" "$USER_NAME" "$PASSWORD")
  fi
  WHERE=$PASSWD_FILE
fi

# ---- report ----------------------------------------------------------------------------------
if [ "$MODE" = remove ]; then
  echo "Removed $USER_NAME from $WHERE."
elif [ "$MODE" = bridge ]; then
  echo "Bridge user '$BRIDGE_USER' set in $WHERE."
  if [ "$GENERATED" = true ]; then
    echo
    echo "Generated password; the bridge reads it from MQTT_PASSWORD. Put this line in deploy/.env:"
    echo "  MQTT_PASSWORD=$PASSWORD"
  fi
else
  cat <<EOF
Device $USER_NAME set in $WHERE.

Firmware settings (ESP-MQTT; MQTT 3.1.1 is enough):
  broker URI   mqtt://$BROKER_HOST:1883    (mqtts://$BROKER_HOST:8883 with the TLS listener)
  client id    $USER_NAME
  username     $USER_NAME
  password     $PASSWORD
  publish      $PREFIX/$USER_NAME/in/audio      QoS 0, binary audio frames
               $PREFIX/$USER_NAME/in/control    QoS 1, JSON start/cancel
  subscribe    $PREFIX/$USER_NAME/out/#         QoS 1, bridge replies
               $PREFIX/status                  QoS 1, retained bridge status (optional)
EOF
  if [ "$GENERATED" = true ]; then
    echo
    echo "The password was generated and is not stored anywhere else: note it now."
  fi
fi
if [ "$USE_COMPOSE" = false ]; then
  echo
  echo "A running broker needs a reload to see it: docker compose -f deploy/docker-compose.yml kill -s SIGHUP mosquitto"
fi
