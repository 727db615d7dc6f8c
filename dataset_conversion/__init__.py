"""Converters from MS lesion datasets (and the built-in phantom) to nnU-Net's raw format."""

# converter name -> "module:click_command"; each module exposes its click command as `command`.
CONVERTERS = {
    "phantom": "dataset_conversion.phantom:command",
    "basel": "dataset_conversion.basel:command",
    "wmh2017": "dataset_conversion.wmh2017:command",
    "msseg2016": "dataset_conversion.msseg2016:command",
    "isbi2015": "dataset_conversion.isbi2015:command",
    "mslesseg": "dataset_conversion.mslesseg:command",
    "shifts": "dataset_conversion.shifts:command",
}
