"""Disaggregated prefill/decode: the KV hand-off between a prefill worker and a decode worker."""
