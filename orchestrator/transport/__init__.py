"""Channels between the two orchestrators: stream, back channel, control."""
