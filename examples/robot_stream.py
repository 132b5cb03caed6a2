"""Streaming generation for a control loop: tokens arrive as they decode, and the loop can stop
the generation at any moment (here: after the first sentence) without waiting for it to finish.

    python examples/robot_stream.py bundles/smollm2-int4
"""
import sys

import edge

if len(sys.argv) != 2:
    sys.exit("usage: python examples/robot_stream.py BUNDLE   (make one with examples/quickstart.sh)")
model = edge.load(sys.argv[1], threads=2, context_length=1024)
messages = [{"role": "system", "content": "You are the voice of a warehouse robot. Be brief."},
            {"role": "user", "content": "A box fell off the conveyor. What do you do?"}]
said = ""
stream = model.chat(messages, stream=True, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=0)
for piece in stream:
    said += piece
    print(piece, end="", flush=True)
    if any(p in piece for p in ".!?"):
        stream.close()          # cancel: frees the model for the next request at once
        break
print()
s = model.last_stats
print(f"[{s.generated_tokens} tokens, {s.decode_tok_s:.0f} tok/s, finish: {s.finish_reason}]")
