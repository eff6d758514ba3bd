"""The diffusion decoding loop inside vLLM's worker processes.

`DiffusionWorkerExtension` is mixed into vLLM's worker (`worker_extension_cls`); the engine
calls `starquant_diffusion_generate` on every worker through `LLM.collective_rpc`. Each
tensor-parallel rank runs the same loop in lock-step: logits are gathered over ranks by
the LM head, so every rank sees the same logits and commits the same tokens. The loop is
the core's `diffusion_generate`, so vLLM decoding has exactly the core's semantics.
"""

import torch

from ..diffusion import DiffusionSamplingConfig, diffusion_generate

__all__ = ["DiffusionWorkerExtension"]


class DiffusionWorkerExtension:
    """Methods added to vLLM's worker class (`self` is the worker)."""

    def _starquant_canvases(self, input_ids: list[list[int]], attention_mask: list[list[int]]):
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
        return model, as_tensor(input_ids), as_tensor(attention_mask)

    def starquant_diffusion_generate(
        self, input_ids: list[list[int]], attention_mask: list[list[int]], sampling: dict
    ) -> list[list[int]]:
        """Left-padded prompts [batch, prompt_len] -> generated ids [batch, gen_length]."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        with torch.inference_mode():
            output = diffusion_generate(
                model.diffusion_logits, ids, model.config.mask_token_id, DiffusionSamplingConfig(**sampling), mask
            )
        return output.generated.cpu().tolist()

    def starquant_logits(self, input_ids: list[list[int]], attention_mask: list[list[int]]) -> list:
        """Logits [batch, seq, vocab] of fixed canvases, as nested float32 lists (for tests and checks)."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        with torch.inference_mode():
            return model.diffusion_logits(ids, mask).float().cpu().tolist()

    def starquant_block_outputs(self, input_ids: list[list[int]], attention_mask: list[list[int]]) -> list:
        """Each block's output [batch, seq, d_model] on fixed canvases (per-layer agreement checks)."""
        model, ids, mask = self._starquant_canvases(input_ids, attention_mask)
        outputs = []
        hooks = [
            block.register_forward_hook(lambda module, args, output: outputs.append(output.float().cpu()))
            for block in model.model.transformer.blocks
        ]
        try:
            with torch.inference_mode():
                model.diffusion_logits(ids, mask)
        finally:
            for hook in hooks:
                hook.remove()
        return [output.tolist() for output in outputs]

    def starquant_model_info(self) -> dict:
        """What the worker loaded: model class, dtype, quantization method, and the linear
        method of every block linear (by name).

        (Parameter bytes would mislead: on CPU, vLLM repacks unquantized linear weights for
        oneDNN and leaves empty parameters behind.)
        """
        model = self.model_runner.get_model()
        linears = {}
        for name, module in model.named_modules():
            method = getattr(module, "quant_method", None)
            if ".blocks." in name and method is not None:
                inner = getattr(method, "inner", None)
                linears[name] = type(method).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
        return {
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype),
            "quantization": self.vllm_config.model_config.quantization,
            "linear_methods": linears,
        }

    def starquant_tensors(self, names: list[str]) -> dict[str, list]:
        """Named parameters of this rank, as nested lists (tests check what was loaded)."""
        parameters = dict(self.model_runner.get_model().named_parameters())
        return {name: parameters[name].detach().float().cpu().tolist() for name in names}
