"""Input and output: Keras HDF5 files (keras_io), CSAW data and images (data), the job's
folder (workdir), CSV and markdown tables, and the defences' reports and plots."""
