# Type stub of the compiled extension dense_ext._C (csrc/). Loading it registers the
# torch.ops.dense_ext.* operators; it defines no Python names of its own.
