"""The PyTorch predictor times at its own thread count without changing the caller's."""

import torch


def test_torch_predictor_runs_at_its_thread_count_and_gives_the_callers_back():
    from ultralytics import YOLO

    from yoloq.runtime.predictors import TorchPredictor

    model = YOLO("yolov8n.yaml").model
    seen = []
    model.model[0].register_forward_hook(lambda m, i, o: seen.append(torch.get_num_threads()))
    caller = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = TorchPredictor(model, 64, 2, "fp32").raw(torch.zeros(1, 3, 64, 64))
        assert out.shape[0] == 1 and seen == [2]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(caller)
