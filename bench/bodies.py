"""The request bodies every bench script sends, written into a folder.

    python3 bench/bodies.py DIR [--big] [--long]

writes DIR/chat.json (non-streamed chat, gpt-4o-mini, max_tokens 64), stream.json (the same,
streamed), drip.json and slow.json (streamed, to the mock's drip-mini and slow-mini models,
which pace their events); with --big also big.json (a ~100k-token prompt of English-like
prose, bench/run.sh's long-prompt case) and with --long long.json (a ~30k-word prompt of a
few words, bench/pgo.sh's training run).
"""
import json
import random
import sys


def chat(model="gpt-4o-mini", stream=False, content="Write one sentence about toll bridges."):
    body = {"model": model,
            "messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": content}],
            "max_tokens": 64}
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":"))


COMMON = ("the of and to in is that for it as was with be by on not he this are or his from at which "
          "but have an they you were her she there been one all we their has would when if so no will "
          "what can more about up out them some time could into only other new these two may then do "
          "first any my now such like our over man me even most made after also did many before must "
          "through back years where much your way well down should because each just those people how "
          "too little state good very make world still own see men work long get here between both life "
          "being under never day same another know while last might us great old year off come since "
          "against go came right used take three").split()
RARE = ("gateway budget ledger tokenizer latency throughput reservation downgrade fallback metering "
        "invoice quarterly procurement amortized idempotent heuristics telemetry Kubernetes PostgreSQL "
        "microservice configuration observability serialization asynchronous deterministic").split()


def prose(tokens=100_000, seed=5):
    """About `tokens` o200k tokens of English-like prose: common words, rarer ones, numbers,
    punctuation."""
    rng = random.Random(seed)
    words, n = [], 0
    while n < tokens:
        r = rng.random()
        if r < 0.80:
            w = rng.choice(COMMON)
        elif r < 0.93:
            w = rng.choice(RARE)
        else:
            w = str(rng.randint(0, 99999))
        if rng.random() < 0.08:
            w += rng.choice([",", ".", ";", ":"])
        words.append(w)
        n += 1 if r < 0.80 else 2 if r < 0.93 else 3
    return " ".join(words)


def main(argv):
    if not argv or argv[0].startswith("-"):
        sys.exit(__doc__)
    folder, flags = argv[0], set(argv[1:])
    unknown = flags - {"--big", "--long"}
    if unknown:
        sys.exit(f"bench/bodies.py: unknown option {sorted(unknown)[0]}")
    files = {
        "chat.json": chat(),
        "stream.json": chat(stream=True),
        "drip.json": chat("drip-mini", stream=True),
        "slow.json": chat("slow-mini", stream=True),
    }
    if "--big" in flags:
        files["big.json"] = chat(content="Summarise this document:\n" + prose())
    if "--long" in flags:
        rng = random.Random(7)
        few = ["toll", "bridge", "gateway", "budget", "token", "model", "stream", "ledger", "cost"]
        files["long.json"] = chat(content=" ".join(rng.choice(few) for _ in range(30000)))
    for name, body in files.items():
        with open(f"{folder}/{name}", "w") as f:
            f.write(body)


if __name__ == "__main__":
    main(sys.argv[1:])
