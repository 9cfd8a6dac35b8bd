"""Test support: labs, stand-ins and fixtures shared by the test modules."""
