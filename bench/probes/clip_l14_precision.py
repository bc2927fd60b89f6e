"""L-14 image+text tower speed: eager bf16, compiled bf16, fp8 rowwise MLP/attention projections."""
import sys, time, copy
sys.path.insert(0, ".")
import torch, torch.nn as nn
import open_clip
from curate.pipeline.models.clip_text import encode_text_trimmed, trim_tokens
from bench.probes.timing import images_per_second

torch.manual_seed(0)
dev = "cuda"
B = int(sys.argv[1]) if len(sys.argv) > 1 else 256
model = open_clip.create_model("ViT-L-14", pretrained=None, device=dev, weights_only=True).eval().to(torch.bfloat16)
tok = open_clip.get_tokenizer("ViT-L-14")
words = "a photo of red car parked near the old stone bridge in summer light".split()
caps = [" ".join(words[: 8 + i % 8]) for i in range(B)]
tokens = trim_tokens(tok(caps).to(dev))
pix = torch.randn(B, 3, 224, 224, device=dev).clamp(-2, 2).to(torch.bfloat16)

def rate(fn, label, secs=4.0):
    r = images_per_second(fn, B, secs, warmup=3)
    print(f"{label}: {r:,.0f} images/s", flush=True)
    return r

def both(m):
    def f():
        i = m.encode_image(pix, normalize=True)
        t = encode_text_trimmed(m, tokens)
        return i, t
    return f

with torch.inference_mode():
    ref_i, ref_t = both(model)()
rate(both(model), "eager bf16")
rate(lambda: model.encode_image(pix, normalize=True), "eager bf16, image tower only")

class FP8Linear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        w = weight.float()
        s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0
        self.w8 = (w / s).to(torch.float8_e4m3fn)
        self.sw = s.t().contiguous()
        self.bias = None if bias is None else bias.to(torch.bfloat16)
    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        x8 = (x2.float() / sx).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(x8, self.w8.t(), scale_a=sx, scale_b=self.sw, bias=self.bias, out_dtype=torch.bfloat16)
        return y.reshape(*shape[:-1], y.shape[-1])

def fp8ify(m):
    m = copy.deepcopy(m)
    for block in m.visual.transformer.resblocks:
        block.mlp.c_fc = FP8Linear(block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        block.mlp.c_proj = FP8Linear(block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    return m

try:
    m8 = fp8ify(model)
    with torch.inference_mode():
        i8, t8 = both(m8)()
    print("fp8 MLP: max |d img emb cos|", float((1 - (i8.float() * ref_i.float()).sum(-1)).abs().max()),
          "max |d sim|", float(((i8.float() * t8.float()).sum(-1) - (ref_i.float() * ref_t.float()).sum(-1)).abs().max()))
    rate(both(m8), "eager fp8 MLP")
except Exception as e:
    print("fp8 failed", type(e).__name__, str(e)[:300])
    m8 = None

t0 = time.perf_counter()
mc = copy.deepcopy(model)
mc.visual = torch.compile(mc.visual)
rate(both(mc), "compiled bf16 image tower (compile incl. in warm-up)")
print("compile+measure s", time.perf_counter() - t0)
if m8 is not None:
    m8.visual = torch.compile(m8.visual)
    rate(both(m8), "compiled fp8 MLP image tower")
    with torch.inference_mode():
        i8, t8 = both(m8)()
    print("compiled fp8: max |d sim|", float(((i8.float() * t8.float()).sum(-1) - (ref_i.float() * ref_t.float()).sum(-1)).abs().max()))
