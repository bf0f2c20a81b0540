import textwrap

import pytest

from lightning_graphs.capture_errors import explain_capture_error, user_frame


def _raise_from_user_file(tmp_path, body: str):
    """Runs ``body`` as if it were a user's module and returns the exception it raises."""
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(body))
    namespace = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    with pytest.raises(Exception) as info:
        namespace["training_step"]()
    return info.value


def test_explanation_names_the_user_line_and_the_operation(tmp_path):
    exc = _raise_from_user_file(
        tmp_path,
        """
        import torch
        framework = {}
        # an `item` whose frame lies inside torch, as the real (C) one does
        exec(compile(
            "def item(self):\\n    raise RuntimeError('CUDA error: operation not permitted when stream is capturing')",
            torch.__file__, "exec"), framework)
        FakeTensor = type("FakeTensor", (), {"item": framework["item"]})

        def training_step():
            loss = FakeTensor()
            if loss.item() > 3:
                return None
        """,
    )
    message = explain_capture_error(exc, "the training step")
    assert "user_model.py:12" in message
    assert "training_step" in message
    assert "`.item()`" in message
    assert "if loss.item() > 3:" in message


def test_chained_errors_are_traced_back_to_the_original(tmp_path):
    exc = _raise_from_user_file(
        tmp_path,
        """
        def training_step():
            try:
                print_tensor()
            except RuntimeError as error:
                raise RuntimeError("operation failed due to a previous error during capture") from error

        def print_tensor():
            print(object.__new__(Boom))

        class Boom:
            def __repr__(self):
                raise RuntimeError("operation not permitted when stream is capturing")
        """,
    )
    message = explain_capture_error(exc)
    # the innermost user frame of the original error: Boom.__repr__ in the user's file
    assert "user_model.py" in message
    assert "operation not permitted" in message


def test_without_a_user_frame_the_explanation_points_to_sync_debug_mode():
    try:
        raise RuntimeError("capture failed")
    except RuntimeError as error:
        exc = error
    # the test file itself counts as user code, so strip the traceback
    exc.__traceback__ = None
    message = explain_capture_error(exc)
    assert "set_sync_debug_mode" in message


def test_user_frame_skips_framework_frames():
    import torch

    try:
        torch.ones(2, 2) @ torch.ones(3, 3)
    except RuntimeError as error:
        frame = user_frame(error.__traceback__)
    assert frame is not None and frame.filename.endswith("test_capture_errors.py")


def test_a_draw_from_a_generator_of_the_users_own_is_named_with_the_fix(tmp_path):
    exc = _raise_from_user_file(
        tmp_path,
        """
        import torch
        framework = {}
        # PyTorch refuses, from inside torch, a draw from a generator the graph does not manage
        exec(compile(
            "def randn(*shape, generator=None):\\n"
            "    raise RuntimeError('Attempt to increase offset for a CUDA generator not in capture mode.')",
            torch.__file__, "exec"), framework)

        def training_step():
            noise = framework["randn"](4, generator=object())
        """,
    )
    message = explain_capture_error(exc, "the training step")
    assert "user_model.py:11" in message and "`torch.Generator` of its own" in message
    assert "torch.manual_seed" in message and "leave out `generator=`" in message
    assert "host" not in message  # not the advice for host reads


def test_reading_a_learning_rate_as_a_number_is_named_as_that(tmp_path):
    exc = _raise_from_user_file(
        tmp_path,
        """
        import torch
        framework = {}
        # `float()` of the device tensor a captured step's learning rate is, refused inside torch
        exec(compile(
            "class Rate:\\n"
            "    def __float__(self):\\n"
            "        raise RuntimeError('CUDA error: operation not permitted when stream is capturing')",
            torch.__file__, "exec"), framework)

        class Optimizer:
            param_groups = [{"lr": framework["Rate"]()}]

        def training_step():
            lr = float(Optimizer.param_groups[0]["lr"])
        """,
    )
    message = explain_capture_error(exc, "the training step")
    assert "user_model.py:15" in message
    assert "reading an optimizer setting as a number" in message and "loss * group['lr']" in message


_LIBRARY_LINES = {
    # float() raises in C, as it does on a captured tensor: the read is named from the library's line
    "read": ("return 1.0 / float(count)", "converting a tensor to a Python number"),
    # a condition in a library's own line says nothing of what failed
    "condition": ("return count.upper() if count else None", "not allowed while a CUDA graph is being"),
}


@pytest.mark.parametrize("kind", list(_LIBRARY_LINES))
def test_an_error_raised_inside_a_library_names_that_line_and_what_it_does(tmp_path, monkeypatch, kind):
    from lightning_graphs import capture_errors

    source, meaning = _LIBRARY_LINES[kind]
    library = tmp_path / "somelib"
    library.mkdir()
    (library / "norm.py").write_text(f"def forward(count):\n    {source}\n")
    monkeypatch.setattr(capture_errors, "_FRAMEWORK_DIRS", capture_errors._FRAMEWORK_DIRS + (f"{library}/",))
    exc = _raise_from_user_file(
        tmp_path,
        f"""
        import runpy
        norm = runpy.run_path({str(library / "norm.py")!r})

        def training_step():
            return norm["forward"]({"'a count'" if kind == "read" else 1})
        """,
    )
    if kind == "condition":  # (what CUDA says of an operation refused during capture)
        exc = RuntimeError("operation not permitted when stream is capturing").with_traceback(exc.__traceback__)
    message = explain_capture_error(exc)
    assert meaning in message, message
    assert "user_model.py:6 in `training_step`" in message, message
    assert f"inside norm.py:2: `{source}`" in message, message
