"""Adapters to outside services (AWS, callback endpoints), each holding its clients once per process."""
