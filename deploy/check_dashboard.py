#!/usr/bin/env python3
"""Checks deploy/grafana/dashboards/ymera.json against real YMERA processes.

    python3 deploy/check_dashboard.py SCRAPE_URL... [--prometheus URL]

* every `ymera_*` metric a panel queries is in one of the scrapes (GET
  /metrics of running roles), and every `by (...)` label is a label they
  export (or job/instance/le, which Prometheus adds);
* with --prometheus (a Prometheus scraping those roles), every query is run
  ($__rate_interval as 1m, $job as .*) and must parse and return data.

Exits non-zero on any problem. Standard library only.
"""
import argparse
import json
import pathlib
import re
import sys
import urllib.parse
import urllib.request

DASHBOARD = pathlib.Path(__file__).parent / "grafana" / "dashboards" / "ymera.json"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("scrapes", nargs="+", help="URLs of GET /metrics")
    ap.add_argument("--prometheus", help="base URL of a Prometheus scraping them")
    ap.add_argument("--dashboard", default=str(DASHBOARD))
    args = ap.parse_args()

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    names, labels = set(), {"job", "instance", "le"}
    for url in args.scrapes:
        for line in opener.open(url, timeout=10).read().decode().splitlines():
            if line and not line.startswith("#"):
                m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?", line)
                names.add(m.group(1))
                labels |= set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(2) or ""))

    dash = json.load(open(args.dashboard))
    # Prometheus queries only: the trace panels query Jaeger.
    queries = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])
               if "expr" in t]
    queries += [(f"variable {v['name']}", v["definition"].split("(", 1)[1].split(",")[0])
                for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"]
    problems = 0
    for title, expr in queries:
        for name in re.findall(r"\bymera_[a-z_]+", expr):
            if name not in names:
                print(f"missing metric {name} ({title})")
                problems += 1
        for group in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",")):
                if label not in labels:
                    print(f"missing label {label} ({title})")
                    problems += 1
        if args.prometheus:
            q = expr.replace("$__rate_interval", "1m").replace("$job", ".*")
            url = args.prometheus.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": q})
            try:
                res = json.load(opener.open(url, timeout=10))
            except Exception as e:  # a 400 for a query that does not parse
                print(f"query failed ({title}): {q}: {e}")
                problems += 1
                continue
            if not res["data"]["result"]:
                print(f"no data ({title}): {q}")
                problems += 1
    print(f"{len(queries)} queries, {len(names)} metric names scraped, {problems} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
