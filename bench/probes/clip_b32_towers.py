"""B-32: where the text tower's time goes, and what compile / CUDA graphs give."""
import sys
sys.path.insert(0, ".")
import torch
import open_clip
from curate.pipeline.models.clip_text import encode_text_trimmed, trim_tokens

from bench.clip_score import make_captions
from bench.probes.timing import images_per_second

torch.manual_seed(0)
B = 1024
model = open_clip.create_model("ViT-B-32", pretrained=None, device="cuda", weights_only=True).eval().to(torch.bfloat16)
tok = open_clip.get_tokenizer("ViT-B-32")
caps = make_captions(B, seed=1)
tokens = trim_tokens(tok(caps).cuda())
print("trimmed length", tokens.shape)
pix = torch.randn(B, 3, 224, 224, device="cuda").clamp(-2, 2).to(torch.bfloat16)

def rate(fn, label, secs=2.0):
    r = images_per_second(fn, B, secs, warmup=3)
    print(f"{label}: {r:,.0f} /s ({B / r * 1000:.2f} ms per batch)", flush=True)

text = lambda: encode_text_trimmed(model, tokens)
img = lambda: model.encode_image(pix, normalize=True)
rate(text, "text trimmed eager")
rate(img, "image eager")
rate(lambda: (img(), text()), "both eager")
from torch.profiler import profile, ProfilerActivity
with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3): text()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3): img()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
ct = torch.compile(lambda t: encode_text_trimmed(model, t), dynamic=False)
rate(lambda: ct(tokens), "text compiled")
cg = torch.compile(lambda t: encode_text_trimmed(model, t), mode="reduce-overhead", dynamic=False)
rate(lambda: cg(tokens).clone(), "text compiled cudagraphs")
ci = torch.compile(model.visual, mode="max-autotune-no-cudagraphs")
rate(lambda: ci(pix), "image compiled max-autotune-no-cudagraphs")
