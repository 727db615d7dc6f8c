"""Converters from MS lesion datasets (and the built-in phantom) to nnU-Net's raw format."""

# converter name -> "module:click_command"; each module exposes its click command as `command`.
CONVERTERS = {
    "phantom": "dataset_conversion.phantom:command",
    "basel": "dataset_conversion.basel:command",
}
