"""The Streamlit app: balance and overfitting views over recorded runs."""
