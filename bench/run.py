#!/usr/bin/env python3
"""`make bench`: the gateway against nginx on the same core budget, in one run.

Every proxy (nginx or the gateway) runs with one worker pinned to CPU 0; the upstream (nginx
answering `return 200`) and the load generator (wrk) share CPU 1. Each setup is driven by the
same wrk command, after a short warm-up, and reported as requests/s, p50 and p99 latency, and
ratios to (c) nginx with limit_req and to (a) the direct upstream. Results go to
target/bench/report.json and a chart to target/bench/report.png.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "target" / "bench"
GATEWAY = ROOT / "target" / "release" / "gateway"
BARE_PINGORA = ROOT / "target" / "release" / "examples" / "bare_pingora"

UPSTREAM_PORT = 18000
NGINX_PORT = 18001
GATEWAY_PORT = 18080
GATEWAY_ADMIN_PORT = 19090
DURATION = os.environ.get("BENCH_DURATION", "10s")
CONNECTIONS = os.environ.get("BENCH_CONNECTIONS", "50")
PROXY_CPU = "0"
LOAD_CPU = "1"

NGINX_COMMON = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  {http}
}}
"""

UPSTREAM_HTTP = """
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "ok\\n"; }}
  }}
"""

PROXY_HTTP = """
  keepalive_requests 1000000;
  {zone}
  upstream app {{
    server 127.0.0.1:{upstream};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      {limit}
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://app;
    }}
  }}
"""

GATEWAY_CONFIG = """
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin}"
threads = 1
health_paths = []

[upstreams.app]
address = "127.0.0.1:{upstream}"

[[routes]]
name = "app"
path_prefix = "/"
upstream = "app"

{store}
{limits}
"""

ALLOW_ALL_LIMIT = """
[[limits]]
name = "everything"
path_prefix = "/"
applies_to = "everyone"
quantity = 1000000000
window_secs = 60
"""

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
REDIS_STORE = f"""
[store]
backend = "redis"
redis_url = "{REDIS_URL}"
key_prefix = "tollgate-bench:"
"""

DENY_ALL_LIMIT = """
[[limits]]
name = "nothing"
path_prefix = "/"
applies_to = "everyone"
quantity = 1
window_secs = 86400
"""


def wait_for_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def ensure_port_free(port):
    """A leftover server on a bench port would be measured in place of the one started."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            pass
    except OSError:
        return
    raise RuntimeError(f"port {port} is already in use; stop whatever listens there first")


def start(cmd, cpu, log, env=None):
    full = ["taskset", "-c", cpu] + cmd
    return subprocess.Popen(full, stdout=log, stderr=log, env=env, start_new_session=True)


def stop(process):
    if process and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def nginx(name, http, cpu):
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    conf = directory / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(dir=directory, http=http))
    log = open(directory / "stdout.log", "w")
    return start(["nginx", "-c", str(conf), "-p", str(directory)], cpu, log)


def gateway(name, store="", limits=""):
    directory = OUT / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    conf = directory / "gateway.toml"
    conf.write_text(
        GATEWAY_CONFIG.format(
            port=GATEWAY_PORT,
            admin=GATEWAY_ADMIN_PORT,
            upstream=UPSTREAM_PORT,
            store=store,
            limits=limits,
        )
    )
    env = dict(os.environ, RUST_LOG="warn", IDENTITY_HASH_KEY="bench")
    env.pop("REDIS_URL", None)  # the configuration says which store each setup uses
    log = open(directory / "stdout.log", "w")
    return start([str(GATEWAY), "--config", str(conf)], PROXY_CPU, log, env)


def bare_pingora():
    directory = OUT / "bare-pingora"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log = open(directory / "stdout.log", "w")
    listen, upstream = f"127.0.0.1:{GATEWAY_PORT}", f"127.0.0.1:{UPSTREAM_PORT}"
    return start([str(BARE_PINGORA), listen, upstream], PROXY_CPU, log)


LATENCY = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(port, seconds=DURATION):
    url = f"http://127.0.0.1:{port}/"
    cmd = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}",
           "--latency", url]
    output = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    latency = {p: float(v) * scale[u] for p, v, u in LATENCY.findall(output)}
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return {
        "requests": int(re.search(r"(\d+) requests in", output).group(1)),
        "requests_per_sec": rps,
        "p50_ms": latency.get("50"),
        "p99_ms": latency.get("99"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def cpu_seconds(process):
    """CPU time (user + system) used so far by every thread of the process's group."""
    ticks = 0
    members = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True)
    for pid in members.stdout.split():
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(label, port, process):
    """Drives one setup; `process` is the server under test (the proxy, or the upstream for
    the direct setup), whose CPU time per request is reported beside the throughput. On a
    shared machine CPU per request moves less than requests/s does."""
    wait_for_port(port)
    wrk(port, "2s")  # warm-up: connection pools, caches, JIT of nothing
    before = cpu_seconds(process)
    result = wrk(port)
    used = cpu_seconds(process) - before
    result["cpu_us_per_request"] = 1e6 * used / max(result["requests"], 1)
    result["setup"] = label
    print(f"  {label:<42} {result['requests_per_sec']:>10.0f} req/s "
          f"{result['cpu_us_per_request']:>7.1f} CPU us/req", flush=True)
    return result


def setups():
    """Yields (label, start function, port) in the issue's order."""
    yield "(a) direct to upstream", None, UPSTREAM_PORT
    yield "(b) nginx proxy_pass", lambda: nginx(
        "nginx-proxy", PROXY_HTTP.format(zone="", limit="", upstream=UPSTREAM_PORT,
                                         port=NGINX_PORT), PROXY_CPU), NGINX_PORT
    yield "(c) nginx limit_req", lambda: nginx(
        "nginx-limit", PROXY_HTTP.format(
            zone="limit_req_zone $binary_remote_addr zone=all:10m rate=100000000r/s;",
            limit="limit_req zone=all burst=1000000 nodelay;",
            upstream=UPSTREAM_PORT, port=NGINX_PORT), PROXY_CPU), NGINX_PORT
    yield "(d) gateway, no limits", lambda: gateway("gateway-plain"), GATEWAY_PORT
    yield "(e) gateway, memory limit", lambda: gateway(
        "gateway-memory", limits=ALLOW_ALL_LIMIT), GATEWAY_PORT
    yield "(f) gateway, redis limit", lambda: gateway(
        "gateway-redis", store=REDIS_STORE, limits=ALLOW_ALL_LIMIT), GATEWAY_PORT
    yield "(g) gateway, 429 to everything", lambda: gateway(
        "gateway-deny", limits=DENY_ALL_LIMIT), GATEWAY_PORT
    # Not one of the compared setups: the floor the gateway is built on, to tell its costs
    # from Pingora's.
    yield "(h) bare Pingora proxy (reference)", bare_pingora, GATEWAY_PORT


def chart(results):
    data = OUT / "report.dat"
    with open(data, "w") as handle:
        for result in results:
            label = result["setup"].replace('"', "")
            handle.write(f'"{label}" {result["requests_per_sec"]:.0f}\n')
    script = f"""
set terminal pngcairo size 1200,560 noenhanced
set bmargin 9
set rmargin 24
set output '{OUT / "report.png"}'
set title 'Requests per second, one proxy core (higher is better)'
set style fill solid 0.8
set boxwidth 0.6
set yrange [0:*]
set xtics rotate by -25
set grid ytics
unset key
plot '{data}' using 0:2:xtic(1) with boxes lc rgb '#3b6ea8', \\
     '' using 0:2:(sprintf('%.0f', $2)) with labels offset 0,0.8
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for port in (UPSTREAM_PORT, NGINX_PORT, GATEWAY_PORT, GATEWAY_ADMIN_PORT):
        ensure_port_free(port)
    print(f"wrk -t1 -c{CONNECTIONS} -d{DURATION}; proxies on CPU {PROXY_CPU}, "
          f"upstream and wrk on CPU {LOAD_CPU}", flush=True)
    upstream = nginx("upstream", UPSTREAM_HTTP.format(port=UPSTREAM_PORT), LOAD_CPU)
    results = []
    try:
        for label, launch, port in setups():
            process = launch() if launch else None
            try:
                results.append(measure(label, port, process or upstream))
            finally:
                stop(process)
                time.sleep(0.5)
    finally:
        stop(upstream)

    by_label = {r["setup"][:3]: r for r in results}
    direct, limit_req = by_label["(a)"], by_label["(c)"]
    for result in results:
        result["rps_vs_c"] = result["requests_per_sec"] / limit_req["requests_per_sec"]
        result["rps_vs_a"] = result["requests_per_sec"] / direct["requests_per_sec"]
        result["p99_vs_c"] = result["p99_ms"] / limit_req["p99_ms"]

    header = f"{'setup':<34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} " \
             f"{'vs (c)':>7} {'vs (a)':>7} {'p99 vs (c)':>10} {'CPU us/req':>10}"
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['setup']:<34} {r['requests_per_sec']:>9.0f} {r['p50_ms']:>8.3f} "
              f"{r['p99_ms']:>8.3f} {r['rps_vs_c']:>7.2f} {r['rps_vs_a']:>7.2f} "
              f"{r['p99_vs_c']:>10.2f} {r['cpu_us_per_request']:>10.1f}")

    targets = {}
    if "(e)" in by_label:
        e, d = by_label["(e)"], by_label["(d)"]
        targets["e_rps_at_least_c"] = e["rps_vs_c"] >= 1.0
        targets["e_p99_at_most_1.2x_c"] = e["p99_vs_c"] <= 1.2
        targets["d_rps_at_least_b"] = d["requests_per_sec"] >= by_label["(b)"]["requests_per_sec"]
        targets["e_at_least_0.95_d"] = e["requests_per_sec"] >= 0.95 * d["requests_per_sec"]
    if "(f)" in by_label:
        targets["f_at_least_0.7_c"] = by_label["(f)"]["rps_vs_c"] >= 0.7
    print()
    for name, held in targets.items():
        print(f"  target {name:<26} {'holds' if held else 'MISSED'}")

    machine = {"cpus": os.cpu_count(), "kernel": os.uname().release,
               "connections": CONNECTIONS, "duration": DURATION}
    report = {"machine": machine, "results": results, "targets": targets}
    (OUT / "report.json").write_text(json.dumps(report, indent=2))
    chart(results)
    print(f"\nwrote {OUT / 'report.json'} and {OUT / 'report.png'}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as error:
        sys.exit(f"bench: {error}")
