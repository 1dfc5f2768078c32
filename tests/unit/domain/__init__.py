"""Tests of nwfilter.domain."""
