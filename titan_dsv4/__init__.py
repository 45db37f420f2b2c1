"""titan_dsv4: torchtitan-style pipeline-parallel training for DeepSeek-V4 with MTP."""
