"""B-32 on one GPU: do JPEG decoding and the model overlap, and which decoder is fastest?

Measures, on 5,000 bench JPEGs in batches of 1,024:
- the model alone (eager, text padding trimmed, as curate runs it);
- decoders alone, one thread: torchvision's batched nvJPEG (what curate uses; hardware
  JPEG engines for baseline JPEGs), the same plus curate's GPU preprocessing, and
  nvImageCodec (if importable) with its default backends, hardware only, CUDA only,
  and a split between the two;
- the model in the main thread while a decoder runs in a second thread: the sum of the two
  fractions of their solo rates says whether they overlap (2.0) or take turns (1.0); with the
  model on every SM, then on a CUDA green context that keeps 8, 16 or 24 SMs free for the
  decoder's kernels.
The first version of this probe also ran the towers as CUDA graphs (pipeline/clip_graphs.py,
removed after commit 17a8874): graph replays ignored the green context and starved the decoder.
curate itself kept neither: in the score stage the model already waits for each decoded batch,
which leaves the decoder its turns, and end to end graphs, SM split, both and neither measured
within noise of each other (BENCHMARKS.md, probe section).

    python bench/probes/decode_overlap.py
"""
import os
import sys
import threading
import time

sys.path.insert(0, ".")
import torch  # noqa: E402

from bench.clip_score import clip_cfg, make_captions, make_shards  # noqa: E402
from bench.probes.timing import images_per_second  # noqa: E402

SECONDS = 2.0


def main():
    shards, _ = make_shards(5000, 5000, 4000, os.cpu_count())
    from curate.pipeline.stages.score import ClipScorer, gpu_preprocess
    from curate.pipeline.score_reader import read_batches

    cfg = clip_cfg("ViT-B-32", "cuda", "bf16", 1024)
    scorer = ClipScorer(cfg)
    clip = scorer.clip
    batches = [b for b in read_batches(shards / "00000.tar", 1024) if len(b.keys) == 1024]
    print(f"{len(batches)} batches of 1024; {torch.cuda.get_device_name()}", flush=True)
    pixels = torch.randn(1024, 3, 224, 224, device="cuda").clamp_(-2, 2).to(clip.dtype)
    tokens = clip.prepare_tokens(clip.tokenizer(make_captions(1024, seed=1))).cuda()

    def model():
        with torch.inference_mode():
            clip.encode_image(pixels)
            clip.encode_text(tokens)

    from torchvision.io import ImageReadMode, decode_jpeg

    datas = [[torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in b.jpgs] for b in batches]
    it = {"i": 0}

    def nxt(seq):
        it["i"] = (it["i"] + 1) % len(seq)
        return seq[it["i"]]

    def tv():
        decode_jpeg(nxt(datas), mode=ImageReadMode.RGB, device="cuda")

    def tv_prep():
        with torch.inference_mode():
            scorer._pixels_gpu(nxt(batches).jpgs)

    decoders = {"torchvision nvJPEG": tv, "torchvision nvJPEG + curate preprocess": tv_prep}
    try:
        from nvidia import nvimgcodec as nv

        params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                 sample_format=nv.SampleFormat.P_RGB)
        streams = [[nv.CodeStream(j) for j in b.jpgs] for b in batches]
        backends = {
            "default": None,
            "hw only": [nv.Backend(nv.BackendKind.HW_GPU_ONLY)],
        }
        for name, be in backends.items():
            dec = nv.Decoder(device_id=0, backends=be) if be else nv.Decoder(device_id=0)

            def run(dec=dec, prep=False):
                stream = torch.cuda.current_stream().cuda_stream
                out = dec.decode(nxt(streams), params=params, cuda_stream=stream)
                images = [torch.as_tensor(im, device="cuda") for im in out]
                if prep:
                    with torch.inference_mode():
                        gpu_preprocess(images, clip)
                return images

            first = run()
            print(f"nvimgcodec {name}: first image {tuple(first[0].shape)} {first[0].dtype}, "
                  f"{sum(x is None for x in first)} failed", flush=True)
            decoders[f"nvimgcodec {name}"] = run
            decoders[f"nvimgcodec {name} + curate preprocess"] = lambda run=run: run(prep=True)
    except Exception as exc:
        print("nvimgcodec unavailable:", type(exc).__name__, exc, flush=True)

    solo_model = images_per_second(model, 1024, SECONDS)
    print(f"model alone: {solo_model:,.0f} images/s", flush=True)
    solo = {}
    for name, fn in decoders.items():
        solo[name] = images_per_second(fn, 1024, SECONDS)
        print(f"{name} alone: {solo[name]:,.0f} images/s", flush=True)

    # One thread, taking turns: decode + preprocess a batch, then the model on it.
    def serial():
        tv_prep()
        model()
    print(f"serial, one thread (decode + preprocess, then model): {images_per_second(serial, 1024, SECONDS):,.0f} images/s", flush=True)

    def together(name, model_fn, stream, solo_model_rate):
        fn = decoders[name]
        stop = threading.Event()
        result = {}

        def side():
            with torch.cuda.stream(torch.cuda.Stream()):
                result["dec"] = images_per_second(fn, 1024, SECONDS + 0.5, stop=stop)

        t = threading.Thread(target=side)
        t.start()
        time.sleep(0.3)
        with torch.cuda.stream(stream):
            m = images_per_second(model_fn, 1024, SECONDS)
        stop.set()
        t.join()
        d = result["dec"]
        print(f"  together: model {m:,.0f} + {name} {d:,.0f} images/s = {min(m, d):,.0f} pipeline-bound; "
              f"overlap {m / solo_model_rate + d / solo[name]:.2f} (2 = full, 1 = take turns)", flush=True)

    from torch.cuda.green_contexts import GreenContext

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    make = getattr(GreenContext, "create", None) or GreenContext  # PyTorch 2.9-2.11, later
    contexts = []
    for keep in (0, 8, 16, 24):
        if keep:
            contexts.append(make(num_sms=sms - keep, device_id=0))
            stream = contexts[-1].Stream()
        else:
            stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            alone = images_per_second(model, 1024, SECONDS)
        print(f"model on {sms - keep} of {sms} SMs: {alone:,.0f} images/s", flush=True)
        for name in decoders:
            if name.endswith("+ curate preprocess"):
                together(name, model, stream, alone)


if __name__ == "__main__":
    main()
