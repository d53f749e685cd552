"""Shared pytest setup: puts the repo root on sys.path so tests import the flat modules by name."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
