import subprocess
import sys

import ggufllm


def test_public_surface_is_what_it_claims():
    for name in ggufllm.__all__:
        assert getattr(ggufllm, name) is not None


def test_error_tree_has_one_root():
    for name in ggufllm.__all__:
        obj = getattr(ggufllm, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ggufllm.GgufllmError)


def test_import_is_cheap_and_loads_nothing():
    code = ("import sys, ggufllm; "
            "assert ggufllm._service is None; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "import os; assert os.environ['HF_HUB_OFFLINE'] == '1'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_llm_service_singleton_is_lazy_and_shared():
    assert ggufllm.llm_service is ggufllm.llm_service
    assert not ggufllm.llm_service.is_loaded
