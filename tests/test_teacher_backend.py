"""Both teacher backends are `TeacherBackend`s: the methods a cache build calls, with the Protocol's parameters."""

from __future__ import annotations

import inspect

import pytest
from conftest import make_config

from kdcache.errors import BadInputError
from kdcache.teacher.backend import TEACHER_BACKENDS, TeacherBackend
from kdcache.teacher.build import make_backend
from kdcache.teacher.hf import HFTeacher
from kdcache.teacher.vllm import VLLMTeacher


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.mark.parametrize("backend", [HFTeacher, VLLMTeacher])
def test_backends_have_the_protocols_methods_and_parameters(backend):
    assert issubclass(backend, TeacherBackend)
    for name in ("score", "generate"):
        assert _parameters(getattr(backend, name)) == _parameters(getattr(TeacherBackend, name)), name


def test_make_backend_returns_a_teacher_backend(tmp_path, teacher_dir, data_file, tokenizer):
    backend = make_backend(make_config(tmp_path / "cache", teacher_dir, data_file), len(tokenizer))
    assert isinstance(backend, HFTeacher) and isinstance(backend, TeacherBackend)


def test_an_object_without_generate_is_not_a_backend():
    class ScoreOnly:
        def score(self, batch_ids, batch_masks, sparsify):
            return []

    assert not isinstance(ScoreOnly(), TeacherBackend)


def test_an_unknown_backend_is_refused_with_the_ones_that_exist(tmp_path, teacher_dir, data_file):
    config = make_config(tmp_path / "cache", teacher_dir, data_file)
    config.teacher.backend = "onnx"
    with pytest.raises(BadInputError, match=r"teacher.backend must be one of \['hf', 'vllm'\], got 'onnx'"):
        make_backend(config, 384)
    assert TEACHER_BACKENDS == ("hf", "vllm")
