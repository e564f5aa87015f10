# Sourced by the benchmark scripts: the tools they install, and one nginx of their own
# under $WORK (the origin, and for some a proxy in front of it).

# need_tools CMD...: installs the Debian packages of the commands that are missing
# (`time` for /usr/bin/time).
need_tools() {
  local missing=()
  for tool in "$@"; do
    case $tool in
      time) [ -x /usr/bin/time ] || missing+=(time) ;;
      *) command -v "$tool" >/dev/null || missing+=("$tool") ;;
    esac
  done
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# nginx_start HTTP_EXTRA SERVERS: writes $WORK/nginx.conf (the common part, then
# HTTP_EXTRA directives and the SERVERS blocks inside `http`) and starts nginx; files to
# serve go in $WORK/www, the access log is $WORK/logs/access.log.
nginx_start() {
  mkdir -p "$WORK/www" "$WORK/logs" "$WORK/tmp"
  chmod 755 "$WORK" "$WORK/www" # nginx's workers are not root
  chmod 644 "$WORK"/www/* 2>/dev/null || true
  cat > "$WORK/nginx.conf" <<CONF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/logs/error.log;
events { worker_connections 1024; }
http {
  sendfile on;
  client_body_temp_path $WORK/tmp;
  proxy_temp_path $WORK/tmp;
  fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp;
  scgi_temp_path $WORK/tmp;
$1
$2
}
CONF
  nginx -p "$WORK" -c "$WORK/nginx.conf"
}

nginx_stop() {
  nginx -p "$WORK" -c "$WORK/nginx.conf" -s quit 2>/dev/null || true
}
