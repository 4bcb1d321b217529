"""The DICOM network side: SCP handlers, configuration and the `minipacs` command."""
