"""The original client: sends a seeded workload to a running server (client/load.py sends it), then reads
`/stats` and writes the results.

Owns finding the server (URL, API key, whether it is up), reading its /stats, and the files of one run:
`stats.txt`, `token_data_<policy>.csv` (mean latency per requested token count, what the plot draws) and
`requests_<policy>.csv` (one row per request). `experiment.py` reuses these functions for its comparison.

    python client/client.py                                # 100 requests, num_tokens from 1 25 100
    python client/client.py --prompt "Hello" --numtokens 20

The END STATS are the server's figures over this run's requests (`/stats?since=`, see README): a server that
served others before still reports this run alone. Ctrl-C or SIGTERM ends the run with a one-line message.
"""
import argparse
import csv
import itertools
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python client/client.py): the package from the checkout instead
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import requests  # noqa: E402
from dotenv import load_dotenv  # noqa: E402

from client.interrupts import interrupted, stopping_cleanly_on_signals  # noqa: E402
from client.load import auth_headers, error_text, run_load  # noqa: E402
from client.workload import DEFAULT_NUM_TOKENS_RANGE, SELECTIONS, PromptData, Request  # noqa: E402
from telemetry.latency import RequestRecord  # noqa: E402

CLIENT_DIR = Path(__file__).resolve().parent
DEFAULT_PORT = 8500


class ServerUnavailable(Exception):
    """The server is down, still loading, or refuses our key; the message says what to do."""


# --- talking to the server ------------------------------------------------------------------------------------

def server_url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def error_message(response: requests.Response) -> str:
    return error_text(response.status_code, response.content)


def check_server(url: str, key: str | None = None) -> None:
    """Fail early, with one message rather than one per request, when the server is down, loading or locked."""
    try:
        health = requests.get(f"{url}/health", timeout=10)
        # /health is open to all; /stats is not, so it tells whether our key (or no key) is accepted.
        stats = requests.get(f"{url}/stats", headers=auth_headers(key), timeout=10) if health.ok else None
    except requests.ConnectionError:
        raise ServerUnavailable(
            f"cannot reach the server at {url}: start it with ./server.sh nobatch|static|dynamic, "
            f"or set IP (and PORT) in {CLIENT_DIR / '.env'}"
        ) from None
    if health.status_code == 503:
        raise ServerUnavailable(f"the server at {url} is not ready: {error_message(health)}")
    if not health.ok:
        raise ServerUnavailable(f"the server at {url} is not healthy: {error_message(health)}")
    if stats.status_code == 401:
        raise ServerUnavailable(f"the server at {url} refused the API key: set KEY in {CLIENT_DIR / '.env'} "
                                f"or pass --key ({error_message(stats)})")


def fetch_stats(url: str, key: str | None = None, since: float | None = None) -> dict:
    """The server's /stats; with `since` (a `server-time` it reported earlier), over the requests since then."""
    params = {} if since is None else {"since": since}
    response = requests.get(f"{url}/stats", headers=auth_headers(key), params=params, timeout=30)
    response.raise_for_status()
    return response.json()


# --- results --------------------------------------------------------------------------------------------------

def mean_latency_by_num_tokens(records: list[RequestRecord]) -> dict[int, float]:
    by_tokens = defaultdict(list)
    for record in records:
        if record.ok:
            by_tokens[record.requested_tokens].append(record.e2e)
    return {n: sum(latencies) / len(latencies) for n, latencies in sorted(by_tokens.items())}


def write_latency_csv(path: Path, records: list[RequestRecord]) -> None:
    """`num_tokens,latency`: mean client-measured latency per requested token count (the original's CSV)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["num_tokens", "latency"])
        writer.writerows(mean_latency_by_num_tokens(records).items())


REQUEST_COLUMNS = ("rid", "prompt", "num_tokens", "start", "finish", "latency", "ttft", "server_latency",
                   "prompt_tokens", "completion_tokens", "error", "tpot")


def request_row(rid: int, record: RequestRecord, t0: float) -> dict[str, object]:
    """A request's row: start and finish in seconds since the first request was sent; ttft, server_latency (the
    server's arrival -> last token) and tpot as the server measured them, latency as the client did."""
    return {"rid": rid, "prompt": record.prompt, "num_tokens": record.requested_tokens,
            "start": record.arrival - t0, "finish": record.finish - t0, "latency": record.e2e, "ttft": record.ttft,
            "server_latency": None if record.last_token is None else record.last_token - record.arrival,
            "prompt_tokens": record.prompt_tokens, "completion_tokens": record.output_tokens if record.ok else None,
            "error": record.error, "tpot": record.tpot}


def write_records_csv(path: Path, records: list[RequestRecord]) -> None:
    """One row per request in launch order (rid), every timing; the completion text stays out (printed, not
    plotted)."""
    t0 = min((record.arrival for record in records), default=0.0)
    rows = [request_row(rid, record, t0) for rid, record in enumerate(records)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=REQUEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_run_files(out_dir: Path, label: str, records: list[RequestRecord]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_latency_csv(out_dir / f"token_data_{label}.csv", records)
    write_records_csv(out_dir / f"requests_{label}.csv", records)


# --- command line ---------------------------------------------------------------------------------------------

def print_completion(head: str, record: RequestRecord) -> None:
    body = record.completion if record.ok else f"FAILED: {record.error}"
    print(f"{'=' * 50}\n{head}: {record.requested_tokens} tokens in {record.e2e:.2f} s\n{body}\n{'=' * 50}\n",
          flush=True)


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Values from client/.env fill in the environment (a variable already set wins), as in the original.
    load_dotenv(CLIENT_DIR / ".env")
    parser = argparse.ArgumentParser(description="Send a seeded workload to the inference server.",
                                     formatter_class=ShowDefaults)
    parser.add_argument("--wait", type=float, default=1.0, help="sleep U(0,1) x wait seconds between launches")
    parser.add_argument("--numsamples", type=int, default=100, help="number of requests to make")
    parser.add_argument("--numtokens_range", type=int, nargs="+", default=list(DEFAULT_NUM_TOKENS_RANGE),
                        help="choices for the number of tokens each request asks for")
    parser.add_argument("--selection", choices=SELECTIONS, default="random",
                        help="random: draw num_tokens per request; descend: the same draws, longest first")
    parser.add_argument("--prompt", help="make a single inference on this prompt (needs --numtokens)")
    parser.add_argument("--numtokens", type=int, help="number of tokens for the single inference")
    parser.add_argument("--seed", type=int, default=0, help="workload seed; same seed, same requests")
    parser.add_argument("--port", type=int, default=int(os.getenv("PORT", DEFAULT_PORT)),
                        help="the server's port (PORT in client/.env or the environment); its host is IP there")
    parser.add_argument("--key", help="API key, when the server was started with one (default: KEY in "
                                      "client/.env or the environment)")
    parser.add_argument("--out", type=Path, default=CLIENT_DIR / "results", help="results directory")
    args = parser.parse_args(argv)
    args.key = args.key or os.getenv("KEY")
    if (args.prompt is None) != (args.numtokens is None):
        parser.error("--prompt and --numtokens go together")
    args.url = server_url(os.getenv("IP") or "localhost", args.port)
    return args


def single_inference(args: argparse.Namespace) -> int:
    [record] = run_load(args.url, [Request(args.prompt, args.numtokens)], args.key, progress=False).records
    print_completion(f"Prompt {args.prompt!r}", record)
    return 0 if record.ok else 1


def benchmark(args: argparse.Namespace) -> int:
    workload = PromptData(args.numsamples, args.numtokens_range, args.selection, args.wait, args.seed)
    start = fetch_stats(args.url, args.key).get("server-time")  # the run's window starts here
    answered = itertools.count(1)

    def show(rid: int, record: RequestRecord) -> None:  # the count is the progress: no bar between the completions
        print_completion(f"Request {rid} ({next(answered)}/{len(workload.requests)} answered)", record)

    records = run_load(args.url, workload.requests, args.key, on_finish=show, progress=False).records
    stats = fetch_stats(args.url, args.key, since=start)
    print(f"\n======== END STATS (this run's requests) ========\n{json.dumps(stats, indent=2)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stats.txt").write_text(json.dumps(stats, indent=2) + "\n")
    write_run_files(args.out, stats.get("policy", "server"), records)
    failed = sum(not record.ok for record in records)
    print(f"\n{len(records) - failed} of {len(records)} requests answered; results in {args.out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stopping_cleanly_on_signals():
            check_server(args.url, args.key)
            return single_inference(args) if args.prompt is not None else benchmark(args)
    except (ServerUnavailable, requests.RequestException, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return interrupted(e)


if __name__ == "__main__":
    sys.exit(main())
