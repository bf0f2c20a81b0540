import torch
dev = torch.device("cuda", 0)
x = torch.ones(4, device=dev)
pool = torch.cuda.graph_pool_handle()
s = torch.cuda.Stream()
def attempt(fail, tag):
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(s):
            g.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                y = x * 2
                if fail:
                    y.sum().item()
            except BaseException as e:
                try:
                    g.capture_end()
                except Exception as e2:
                    print(tag, "capture_end raised:", type(e2).__name__, str(e2)[:80])
                raise
            g.capture_end()
        print(tag, "ok")
    except Exception as e:
        print(tag, "failed:", type(e).__name__, str(e)[:80])
        try:
            torch._C._cuda_endAllocateToPool(0, pool); print(tag, "endAllocateToPool: ended")
        except Exception as e3:
            print(tag, "endAllocateToPool raised:", type(e3).__name__, str(e3)[:80])
attempt(False, "A")
attempt(True, "B")
attempt(False, "C")
